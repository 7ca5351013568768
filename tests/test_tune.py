"""--tune-steps: end-to-end tuning of the grids' float fields and the norms, codes fixed (stories260K)."""
import json

import pytest
import torch
import torch.nn.functional as F

from admmq_export.calib import calibration_samples
from admmq_export.cli import main
from admmq_export.fakequant import model_from_ir
from admmq_export.ir import QuantizedModel
from admmq_export.tune import tune_ir
from tests.conftest import TINY_TEXT, export_args


def _kl(ir, ref, ids):
    with torch.no_grad():
        t = F.log_softmax(ref(ids).logits.float(), -1)
        s = F.log_softmax(model_from_ir(ir)(ids).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_tuning_moves_only_float_fields_and_lowers_kl(tmp_path, stories):
    """W3 g32 RTN, then 48 tuning steps: codes and integer fields bit-identical, float fields changed and still
    in their storage dtype, norms changed; KL to the original drops on the held-out windows (the guard) and on
    windows the tuning never saw."""
    out = tmp_path / "r.ir"
    assert main(export_args(out, "--asym", "--nsamples", "16", bits=3)) == 0
    before = QuantizedModel.load(out)
    ir = QuantizedModel.load(out)
    samples = calibration_samples(stories.tokenizer, str(TINY_TEXT), 16, 64, seed=0)
    st = tune_ir(ir, stories.model, samples, steps=48, lr=1e-3, progress=False)
    assert st["kept"] and st["heldout_kl_after"] < st["heldout_kl_before"], st
    assert st["tensors"] == 35 and st["norms"] == 11  # 5 layers x 7 linears; 2 norms per layer + the final one
    changed = 0
    for k, q in ir.linears.items():
        q0 = before.linears[k]
        assert torch.equal(q.codes, q0.codes), k
        for p, t in q.params.items():
            assert t.dtype == q0.params[p].dtype and t.shape == q0.params[p].shape, (k, p)
            if t.is_floating_point() and k.startswith("model.layers."):
                changed += int(not torch.equal(t, q0.params[p]))
            else:  # integer fields (zero points) and the untuned embedding: untouched
                assert torch.equal(t, q0.params[p]), (k, p)
    assert changed == 35
    assert not torch.equal(ir.tensors["model.norm.weight"], before.tensors["model.norm.weight"])
    unseen = calibration_samples(stories.tokenizer, str(TINY_TEXT), 8, 64, seed=7)
    assert _kl(ir, stories.model, unseen) < _kl(before, stories.model, unseen)


def _ce(ir, ids):
    with torch.no_grad():
        logits = model_from_ir(ir)(ids).logits.float()
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def test_ce_tuning_lowers_cross_entropy_codes_fixed(tmp_path, stories):
    """--tune-loss ce: the guard and the statistics speak of held-out cross-entropy, which dropped; codes are
    bit-identical; and the next-token cross-entropy also drops on windows the tuning never saw."""
    out = tmp_path / "r.ir"
    assert main(export_args(out, "--asym", "--nsamples", "16", bits=3)) == 0
    before = QuantizedModel.load(out)
    ir = QuantizedModel.load(out)
    samples = calibration_samples(stories.tokenizer, str(TINY_TEXT), 16, 64, seed=0)
    st = tune_ir(ir, stories.model, samples, steps=48, lr=1e-3, progress=False, loss="ce")
    assert st["loss"] == "ce" and st["kept"] and st["heldout_ce_after"] < st["heldout_ce_before"], st
    assert all(torch.equal(q.codes, before.linears[k].codes) for k, q in ir.linears.items())
    unseen = calibration_samples(stories.tokenizer, str(TINY_TEXT), 8, 64, seed=7)
    assert _ce(ir, unseen) < _ce(before, unseen)


def test_guard_discards_a_tuning_that_does_not_help(tmp_path, stories):
    """A learning rate far too large wrecks the fields: held-out KL rises, so the IR is left exactly as it was."""
    out = tmp_path / "r.ir"
    assert main(export_args(out, "--nsamples", "12", bits=4)) == 0
    ir = QuantizedModel.load(out)
    samples = calibration_samples(stories.tokenizer, str(TINY_TEXT), 12, 64, seed=0)
    st = tune_ir(ir, stories.model, samples, steps=8, lr=0.5, progress=False)
    assert not st["kept"] and st["heldout_kl_after"] > st["heldout_kl_before"], st
    before = QuantizedModel.load(out)
    assert ir.manifest() == before.manifest()


# GGUF Q4_0 (fp16 d per 32) and GPTQ (fp16 scales, integer zeros; with --fallback keep, only the tensors its one
# group size fits): stories' down_proj (in-dim 172) stays float there,
# not a grid; ONNX (fp32 scales) holds it per channel
@pytest.mark.parametrize("to,name,n,extra", [("gguf:q4_0", "t.gguf", 30, ()), ("gptq", "t-gptq", 20, ("--fallback", "keep")),
                                             ("onnx", "t.onnx", 35, ())])
def test_cli_tune_writes_an_exact_file(tmp_path, capsys, to, name, n, extra):
    """--tune-steps through the CLI: the report names the outcome, the IR records it, and the written file still
    holds exactly the (tuned) IR's weights, read back by the format's own checker."""
    out = tmp_path / name
    assert main(export_args(out, "--asym", "--nsamples", "12", "--tune-steps", "16", "--tune-lr", "1e-3", *extra, to=to)) == 0
    printed = capsys.readouterr().out
    assert f"tune: 16 steps (kl) on {n} tensors + 11 norms" in printed
    ir = QuantizedModel.load(out.with_name(out.name + ".ir"))
    assert ir.meta["tune"]["steps"] == 16 and ir.meta["tune"]["lr"] == 1e-3 and ir.meta["tune"]["kept"]
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert rows and all(r["exact"] for r in rows if r["status"] != "unavailable")


@pytest.mark.parametrize("extra,msg", [(("--tune-steps", "-3"), "--tune-steps -3"),
                                       (("--tune-steps", "4", "--tune-lr", "0"), "positive rate"),
                                       (("--tune-steps", "4", "--nsamples", "4"), "more than 4 calibration samples"),
                                       (("--tune-steps", "4", "--tune-loss", "mse"), "--tune-loss 'mse'")])
def test_cli_tune_bad_options(tmp_path, capsys, extra, msg):
    out = tmp_path / "x.ir"
    assert main(export_args(out, *extra)) != 0
    assert msg in capsys.readouterr().err
    assert not out.exists()

"""stories260K end to end: load, calibrate, RTN on several grids, IR round trip, resume, determinism, eval."""
import math

import pytest
import torch
import torch.nn.functional as F

from admmq_export.cli import main
from admmq_export.evaluate import eval_windows, perplexity
from admmq_export.fakequant import model_from_ir, tokenizer_from_ir
from admmq_export.ir import QuantizedModel
from admmq_export.pipeline import StateStore
from tests.conftest import TINY_TEXT, export_args


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 32, False), (2, 16, False), (8, -1, True)])
def test_rtn_grids_end_to_end(tmp_path, bits, group, sym, stories):
    out = tmp_path / "m.ir"
    assert main(export_args(out, *([] if sym else ["--asym"]), bits=bits, group=group)) == 0
    ir = QuantizedModel.load(out)
    assert len(ir.linears) == 5 * 7 and ir.verify_manifest() == []
    for name, q in ir.linears.items():
        cols = q.codes.shape[1]
        want = group if (group > 0 and cols % group == 0) else 0  # down_proj (172) falls back to per-channel
        assert q.grid.group_size == want and q.grid.bits == bits and q.grid.sym == sym, name
        assert int(q.codes.max()) <= 2**bits - 1
    # the IR's fake-quant model really carries the quantized weights
    model = model_from_ir(ir)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, ir.linears["model.layers.0.self_attn.q_proj.weight"].dequant().float())
    assert not torch.equal(w, stories.model.model.layers[0].self_attn.q_proj.weight)


def test_ir_round_trip_and_tamper_detection(tmp_path):
    out = tmp_path / "m.ir"
    assert main(export_args(out)) == 0
    ir = QuantizedModel.load(out)
    ir2_dir = tmp_path / "copy.ir"
    ir.tokenizer_dir = out / "tokenizer"
    ir.save(ir2_dir)
    assert (out / "ir.safetensors").read_bytes() == (ir2_dir / "ir.safetensors").read_bytes()
    assert QuantizedModel.load(ir2_dir).manifest() == ir.stored_manifest
    ir.linears["model.layers.1.mlp.up_proj.weight"].codes[0, 0] ^= 1
    assert ir.verify_manifest() == ["model.layers.1.mlp.up_proj.weight"]


def _crash_after_layer_2(monkeypatch):
    """Make the pipeline's state store raise KeyboardInterrupt right after saving layer 2; the real save returned."""
    real_save = StateStore.save

    def crash(self, done, *args):
        real_save(self, done, *args)
        if done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(StateStore, "save", crash)
    return real_save


def test_same_inputs_give_byte_identical_output_and_resume_matches(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.ir", tmp_path / "b.ir", tmp_path / "c.ir"
    assert main(export_args(a, "--asym", bits=3)) == 0
    assert main(export_args(b, "--asym", bits=3)) == 0
    assert (a / "ir.safetensors").read_bytes() == (b / "ir.safetensors").read_bytes()
    assert (a / "ir.json").read_bytes() == (b / "ir.json").read_bytes()

    real_save = _crash_after_layer_2(monkeypatch)
    assert main(export_args(c, "--asym", "--clip-search", bits=3)) == 130
    assert not c.exists() and (tmp_path / "c.ir.admmq-state" / "state.json").is_file()
    monkeypatch.setattr(StateStore, "save", real_save)
    assert main(export_args(c, "--asym", "--clip-search", "--resume", bits=3)) == 0
    assert main(export_args(b, "--asym", "--clip-search", bits=3)) == 0  # the same run, uninterrupted
    assert (b / "ir.safetensors").read_bytes() == (c / "ir.safetensors").read_bytes()
    assert (a / "ir.safetensors").read_bytes() != (c / "ir.safetensors").read_bytes()  # H-weighted clipping changed codes
    assert not (tmp_path / "c.ir.admmq-state").exists()


def _independent_ppl(model, ids, L):
    n = ids.numel() // L
    nll, cnt = 0.0, 0
    for i in range(n):
        x = ids[i * L : (i + 1) * L].unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=x).logits[0]
        nll += F.cross_entropy(logits[:-1].double(), x[0, 1:], reduction="sum").item()
        cnt += L - 1
    return math.exp(nll / cnt)


def test_perplexity_matches_independent_computation(tmp_path, stories):
    out = tmp_path / "m.ir"
    assert main(export_args(out, bits=3)) == 0
    ir = QuantizedModel.load(out)
    model, tok = model_from_ir(ir), tokenizer_from_ir(ir)
    win = eval_windows(tok, TINY_TEXT, "gptq", seqlen=256)
    ours = perplexity(model, win)
    text = TINY_TEXT.read_text()
    ids = stories.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ref = _independent_ppl(model, ids, 256)
    assert ours["ppl"] == pytest.approx(ref, rel=1e-6)
    orig = perplexity(stories.model, win, reference=None)["ppl"]
    assert orig < ours["ppl"]  # 3-bit RTN hurts
    kl = perplexity(model, win, reference=stories.model)["kld"]
    assert kl > 0 and perplexity(stories.model, win, reference=stories.model)["kld"] == pytest.approx(0, abs=1e-9)


def test_llamacpp_protocol_scores_second_half(stories):
    win = eval_windows(stories.tokenizer, TINY_TEXT, "llamacpp", seqlen=128)
    assert win.first == 64 and (win.ids[:, 0] == stories.tokenizer.bos_token_id).all()
    res = perplexity(stories.model, win)
    assert res["tokens"] == win.ids.shape[0] * 63


def test_linear_groups_follow_shared_inputs(stories):
    from admmq_export.calib import calibration_samples
    from admmq_export.pipeline import _layer_inputs, _layer_kwargs, _linear_groups

    samples = calibration_samples(stories.tokenizer, TINY_TEXT, 2, 32, 0)
    kw = _layer_kwargs(stories.model, samples[:1])
    inps = _layer_inputs(stories.model, samples)
    for i in (0, 4):
        groups = _linear_groups(stories.model.model.layers[i], inps, kw[i], "cpu")
        assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_asym_target_has_the_asymmetric_objective():
    """‖X̃·Ŵᵀ − X·Wᵀ‖² = (n/2)·Tr((Ŵ − W*)H(Ŵ − W*)ᵀ) + const for every Ŵ (no damping), and X̃ = X gives W* = W
    at any damping."""
    from admmq_export.pipeline import asym_target

    g = torch.Generator().manual_seed(0)
    N, n, m = 400, 12, 5
    Xf = torch.randn(N, n, generator=g, dtype=torch.float64)
    Xq = Xf + 0.2 * torch.randn(N, n, generator=g, dtype=torch.float64)  # inputs after earlier quantization
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    H, C = 2 * Xq.T @ Xq / N, 2 * Xq.T @ Xf / N
    Ws = asym_target(W, H, C, damp=0.0)

    def gap(Wh):
        asym = ((Xq @ Wh.T - Xf @ W.T) ** 2).sum()
        quad = N / 2 * torch.trace((Wh - Ws) @ H @ (Wh - Ws).T)
        return float(asym - quad)

    consts = [gap(torch.randn(m, n, generator=g, dtype=torch.float64)) for _ in range(3)]
    assert max(consts) - min(consts) < 1e-8 * abs(consts[0]) + 1e-9
    H0 = 2 * Xf.T @ Xf / N
    for damp in (0.0, 0.01):
        assert torch.allclose(asym_target(W, H0, H0, damp=damp), W, atol=1e-12)


def test_asym_calib_compensates_earlier_layers_and_resumes(tmp_path, monkeypatch, stories):
    """--asym-calib on stories260K with GPTQ: layer 0's q/k/v see unquantized inputs in both streams (same codes
    as the plain run); later layers are fitted to the original model's outputs, so the last hidden state is
    closer to the original model's; an interrupted run resumes (the full-precision stream is in the state) to
    the same bytes; the IR records the option."""
    from admmq_export.calib import calibration_samples

    plain, asym, resumed = tmp_path / "p.ir", tmp_path / "a.ir", tmp_path / "r.ir"
    args = ("--asym", "--nsamples", "16")
    assert main(export_args(plain, *args, method="gptq", bits=3)) == 0
    assert main(export_args(asym, *args, "--asym-calib", method="gptq", bits=3)) == 0
    P, A = QuantizedModel.load(plain), QuantizedModel.load(asym)
    assert A.meta["calibration"]["asymmetric"] is True and P.meta["calibration"]["asymmetric"] is False
    for k in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{k}.weight"
        assert torch.equal(P.linears[name].codes, A.linears[name].codes), name
    assert not torch.equal(P.linears["model.layers.4.mlp.down_proj.weight"].codes,
                           A.linears["model.layers.4.mlp.down_proj.weight"].codes)
    ids = calibration_samples(stories.tokenizer, str(TINY_TEXT), 8, 64, seed=1)  # other windows than calibration

    def last_hidden(model):
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    ref = last_hidden(stories.model)
    err = {k: float(((last_hidden(model_from_ir(ir)) - ref) ** 2).mean()) for k, ir in (("plain", P), ("asym", A))}
    assert err["asym"] < err["plain"], err

    real_save = _crash_after_layer_2(monkeypatch)
    assert main(export_args(resumed, *args, "--asym-calib", method="gptq", bits=3)) == 130
    monkeypatch.setattr(StateStore, "save", real_save)
    assert main(export_args(resumed, *args, "--asym-calib", "--resume", method="gptq", bits=3)) == 0
    assert (asym / "ir.safetensors").read_bytes() == (resumed / "ir.safetensors").read_bytes()


def test_llamacpp_windows_keep_bos_when_the_attribute_says_otherwise(stories):
    """A tokenizer that adds BOS but reports add_bos_token=False (what a saved-and-reloaded Gemma-3 tokenizer
    does) still gets BOS at the start of every llama.cpp window, as llama-perplexity puts it there."""

    class Reloaded:
        def __init__(self, tok):
            self.tok, self.bos_token_id, self.add_bos_token = tok, tok.bos_token_id, False

        def __call__(self, *a, **kw):
            return self.tok(*a, **kw)

    plain = eval_windows(stories.tokenizer, TINY_TEXT, "llamacpp", seqlen=128)
    reloaded = eval_windows(Reloaded(stories.tokenizer), TINY_TEXT, "llamacpp", seqlen=128)
    assert (reloaded.ids[:, 0] == stories.tokenizer.bos_token_id).all()
    assert torch.equal(plain.ids, reloaded.ids)


def test_calibration_windows_start_with_bos_like_the_runtime(tmp_path, stories):
    """Calibration windows get BOS at position 0 when the tokenizer adds BOS (as llama.cpp's perplexity and imatrix
    tools run the model), the rest of each window as cut; --no-calib-bos keeps the windows as cut; the IR records
    which. On Gemma-3-270M W3 g128 this took ADMM-Q's WikiText-2 ppl 79.3 -> 48.2 (BENCHMARKS.md)."""
    from admmq_export.calib import bos_id, calibration_samples

    bos = stories.tokenizer.bos_token_id
    assert bos is not None and bos_id(stories.tokenizer) == bos
    cut = calibration_samples(stories.tokenizer, TINY_TEXT, 6, 48, 3, bos=False)
    with_bos = calibration_samples(stories.tokenizer, TINY_TEXT, 6, 48, 3)
    assert (with_bos[:, 0] == bos).all() and not (cut[:, 0] == bos).all()
    assert torch.equal(with_bos[:, 1:], cut[:, 1:])

    class NoBos:  # a tokenizer with a BOS token that it does not add (SmolLM2's kind)
        bos_token_id = bos

        def __call__(self, *a, **kw):
            return stories.tokenizer(*a, **{**kw, "add_special_tokens": False})

    assert bos_id(NoBos()) is None
    assert torch.equal(calibration_samples(NoBos(), TINY_TEXT, 6, 48, 3), cut)
    for flag, recorded in (([], True), (["--no-calib-bos"], False)):
        out = tmp_path / f"m{len(flag)}.ir"
        assert main(export_args(out, *flag)) == 0
        assert QuantizedModel.load(out).meta["calibration"]["bos"] is recorded

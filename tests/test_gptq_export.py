"""--to gptq / --to marlin: packing, v1/v2 zero points, config, sharding, kernel pre-flight, independent unpacker
bit-exactness, and the reloaded checkpoint's logits against our fake-quant model."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from admmq_export.cli import main
from admmq_export.fakequant import model_from_ir
from admmq_export.grids import int_grid
from admmq_export.ir import QuantizedLinear, QuantizedModel
from conftest import export_args
from converters.gptq import GptqConverter, block_modules, linear_tensors, load_gptq
from converters.gptq_kernels import preflight
from converters.gptq_pack import pack_rows, unpack_rows
from kernels_check.gptq import dequant_linear, load_with_transformers

HAVE_GPTQMODEL = all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum"))
needs_gptqmodel = pytest.mark.skipif(not HAVE_GPTQMODEL, reason="transformers' GPTQ loader needs gptqmodel + optimum, "
                                     "not installed (GPTQModel's wheel pins the newest CUDA torch; pip install --no-deps)")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_bit_positions(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, (64, 40)).astype(np.uint8)
    w = pack_rows(v, bits)
    assert w.shape == (64 * bits // 32, 40) and w.dtype == np.int32
    assert np.array_equal(unpack_rows(w, bits), v)
    one = np.zeros((32, 1), np.uint8)
    one[10, 0] = (1 << bits) - 1
    words = pack_rows(one, bits).view(np.uint32)[:, 0]
    if bits == 3:  # AutoGPTQ: value 10 = low 2 bits at bit 30 of word A, bit 2 at bit 0 of word B
        assert list(words) == [0b11 << 30, 1, 0]
    else:
        pf = 32 // bits
        assert words[10 // pf] == ((1 << bits) - 1) << (bits * (10 % pf))


def _export(tmp_path, to, bits, group, sym, *extra, method="rtn"):
    out = tmp_path / f"{to}-{bits}-{group}-{sym}"
    assert main(export_args(out, "--fallback", "keep", "--sym" if sym else "--asym", *extra, method=method, to=to,
                            bits=bits, group=group)) == 0
    return out


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (3, 32, False), (2, -1, False),
                                            (8, 32, True), (8, -1, False)])
def test_checkpoint_unpacks_bit_exactly(tmp_path, bits, group, sym, capsys):
    out = _export(tmp_path, "gptq", bits, group, sym)
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["sym"] == sym
    assert cfg["group_size"] == group and cfg["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == cfg
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert sum(r["checker"] == "gptq-unpack fp16" for r in rows) > 0
    assert all(r["exact"] for r in rows if r["status"] != "unavailable")


def test_act_order_g_idx_survives(tmp_path, capsys):
    out = _export(tmp_path, "gptq", 4, 32, False, "--act-order", method="gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True
    assert main(["check", str(out)]) == 0


def _ir_with_zero_point_zero():
    grid = int_grid("gptq", 4, 32, False)
    W = torch.randn(64, 64) * 0.1
    W[:, :32] = W[:, :32].abs() + 0.01  # an all-positive group: xmin = 0 -> z = 0
    codes, params = grid.quantize_rtn(W)
    assert int(params["zero"].min()) == 0
    return QuantizedLinear(grid, codes, params)


def test_zero_point_zero_goes_to_v2_never_wraps():
    ql = _ir_with_zero_point_zero()
    t = linear_tensors(ql, "v2")
    assert torch.equal(dequant_linear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, v1=False), ql.dequant())
    with pytest.raises(Exception, match="zero point 0"):
        linear_tensors(ql, "v1")
    ir = QuantizedModel({"model_type": "llama"}, {}, {"model.layers.0.mlp.up_proj.weight": ql})
    assert GptqConverter()._format(ir, None) == "v2"


def test_sharding_with_index(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(GptqConverter, "max_shard_bytes", 50_000)
    out = _export(tmp_path, "gptq", 4, 32, True)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    assert main(["check", str(out)]) == 0


def test_reloaded_checkpoint_matches_fakequant_model(tmp_path):
    out = _export(tmp_path, "gptq", 4, 32, False)
    model, tok = load_gptq(out)
    ref = model_from_ir(QuantizedModel.load(f"{out}.ir"))
    ids = tok("Once upon a time there was a little girl", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    # identical quantized weights; the plain tensors are fp16 in the checkpoint, fp32 in the IR
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_marlin_refusals(tmp_path, capsys):
    for extra in (["--bits", "3"], ["--asym"], ["--group-size", "16"]):
        out = tmp_path / "m"
        args = export_args(out, to="marlin") + extra
        assert main(args) != 0
        assert "Marlin" in capsys.readouterr().err
        assert not out.exists()


def test_marlin_export_and_preflight(tmp_path, capsys):
    out = _export(tmp_path, "marlin", 4, 32, True)
    printed = capsys.readouterr().out
    assert "Marlin can run 0/" in printed and "not divisible by 128" in printed  # stories: in-dim 64
    assert main(["check", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["sym"] and cfg["checkpoint_format"] == "gptq"


def test_preflight_table():
    smol = preflight("model.layers.0.self_attn.q_proj.weight", (576, 576), 4, 64, True, False)
    assert "marlin" not in smol["kernels"] and "in-dim 576 not divisible by 128" in smol["refused"]["marlin"]
    assert "torch" in smol["kernels"]
    gemma = preflight("model.layers.0.mlp.down_proj.weight", (640, 2048), 4, 128, True, True)
    assert "marlin" in gemma["kernels"]
    tp = preflight("model.layers.0.mlp.down_proj.weight", (640, 2048), 4, 32, True, False, tp=32)
    assert "marlin" not in tp["kernels"] and "per shard" in tp["refused"]["marlin"]
    none = preflight("model.layers.0.self_attn.o_proj.weight", (576, 576), 4, 64, True, False, tp=2)  # K 288 per shard
    assert none["kernels"] == [] and "K 288 not divisible by group 64" in none["refused"]["torch"]
    assert none["fix"].startswith("use --group-size 32")
    asym = preflight("model.layers.0.mlp.up_proj.weight", (2048, 640), 4, 128, False, False)
    assert asym["fix"].startswith("for Marlin use --sym")


def test_gptq_refuses_unpackable_layers_without_keep(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(export_args(out, "--fallback", "error", to="gptq", bits=4, group=4)) != 0
    assert "--fallback keep" in capsys.readouterr().err
    assert main(export_args(out, to="gptq", bits=4, group=32)) != 0  # per-channel fallback mixes group sizes
    assert "one group size" in capsys.readouterr().err
    assert not out.exists()


def test_check_kernels_cli(tmp_path, capsys):
    out = _export(tmp_path, "marlin", 4, 32, True)
    capsys.readouterr()
    assert main(["check", str(out), "--kernels", "--json"]) == 0  # torch/triton/exllama can run every layer
    rows = json.loads(capsys.readouterr().out)
    assert all("marlin" in r["refused"] and "torch" in r["kernels"] for r in rows)


def _v2_checkpoint_with_zero_point_zero(tmp_path):
    """A real stories export whose q_proj of layer 0 is re-quantized so one group has z = 0, written by the converter."""
    src = _export(tmp_path, "gptq", 4, 32, False)
    ir = QuantizedModel.load(f"{src}.ir")
    name = "model.layers.0.self_attn.q_proj.weight"
    ql = ir.linears[name]
    W = ql.dequant().float()
    W[:, :32] = W[:, :32].abs() + 1e-3  # all-positive groups: xmin = 0 -> z = 0
    codes, params = ql.grid.quantize_rtn(W)
    assert int(params["zero"].min()) == 0
    ir.linears[name] = QuantizedLinear(ql.grid, codes, params)
    out = tmp_path / "v2"
    ir.save(f"{out}.ir")
    report = GptqConverter().write(ir, out, None)
    assert report["checkpoint_format"] == "gptq_v2"
    return out, ir


def test_v2_zero_point_zero_end_to_end(tmp_path, capsys):
    out, ir = _v2_checkpoint_with_zero_point_zero(tmp_path)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2"
    capsys.readouterr()
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert any(r["tensor"] == "model.layers.0.self_attn.q_proj.weight" and r["exact"] for r in rows)
    with pytest.raises(Exception, match="zero point 0"):
        GptqConverter().write(ir, tmp_path / "v1", "v1")


def test_forced_v2_and_v1_cli(tmp_path, capsys):
    out = tmp_path / "v2cli"
    assert main(export_args(out, "--fallback", "keep", "--asym", to="gptq:v2", bits=3, group=32)) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert main(["check", str(out)]) == 0


def test_kept_layers_excluded_for_transformers_and_gptqmodel(tmp_path):
    out = _export(tmp_path, "gptq", 4, 32, True)  # mlp dims 172 cannot be packed: kept in fp16
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["modules_in_block_to_quantize"] == [["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                    "self_attn.v_proj"]]
    assert "-:model[.]layers[.]0[.]mlp[.]down_proj$" in cfg["dynamic"]
    # names that cannot separate the sets (a module quantized in one block, kept in another): not written
    assert block_modules({"model.layers.0.mlp.up_proj.weight": None}, ["model.layers.1.mlp.up_proj"]) == {}


@needs_gptqmodel
@pytest.mark.parametrize("v2", [False, True])
def test_transformers_loads_checkpoint(tmp_path, v2):
    """transformers' own GPTQ path (optimum + GPTQModel's torch kernel): weights bit-exact, logits ~ fake-quant."""
    if v2:
        out, ir = _v2_checkpoint_with_zero_point_zero(tmp_path)
    else:
        out = _export(tmp_path, "gptq", 3, 32, False)
        ir = QuantizedModel.load(f"{out}.ir")
    model = load_with_transformers(out)
    for name, ql in ir.linears.items():
        got = model.get_submodule(name[: -len(".weight")]).dequantize_weight().T
        assert torch.equal(got.view(torch.int16), ql.dequant().view(torch.int16)), name
    ids = torch.tensor([[1, 400, 300, 20, 45, 99, 7, 256]])
    with torch.no_grad():
        a, b = model(ids).logits.float(), model_from_ir(ir)(ids).logits
    assert (a - b).abs().max() < 2e-2 * b.abs().max()  # fp16 activations vs our fp32 evaluation
    assert torch.equal(a.argmax(-1), b.argmax(-1))

"""`--to onnx` (QDQ) and `--to onnx:matmulnbits` on stories260K (RTN): ONNX Runtime reproduces every weight
bit for bit, the whole LM's logits match the fake-quant torch model, perplexity through ORT matches ours,
and grids a form cannot hold are refused."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from admmq_export.cli import main  # noqa: E402
from tests.conftest import TINY_TEXT, export_args  # noqa: E402

CASES = {  # id: (to, bits, group, extra CLI args)
    "qdq-w4g32-asym": ("onnx", 4, 32, ["--asym"]),
    "qdq-w4g32-sym": ("onnx", 4, 32, []),
    "qdq-w8g32-sym": ("onnx", 8, 32, []),
    "qdq-w3g4-asym": ("onnx", 3, 4, ["--asym"]),
    "qdq-w4g32-asym-fp16scale": ("onnx", 4, 32, ["--asym", "--onnx-scale-dtype", "fp16"]),
    "mnb-w4g32-asym": ("onnx:matmulnbits", 4, 32, ["--asym"]),
    "mnb-w4g32-sym": ("onnx:matmulnbits", 4, 32, []),
    "mnb-w8g16-asym": ("onnx:matmulnbits", 8, 16, ["--asym"]),
    "mnb-w3g32-sym": ("onnx:matmulnbits", 3, 32, []),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(case):
        if case not in cache:
            to, bits, group, extra = CASES[case]
            out = d / f"{case}.onnx"
            assert main(export_args(out, *extra, to=to, bits=bits, group=group)) == 0
            cache[case] = out
        return cache[case]

    return get


def _ir(out):
    from admmq_export.fakequant import ir_path_for
    from admmq_export.ir import QuantizedModel

    return QuantizedModel.load(ir_path_for(out))


@pytest.mark.parametrize("case", list(CASES))
def test_every_weight_exact_in_onnxruntime(exported, case, capsys):
    out = exported(case)
    capsys.readouterr()
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    ort_rows = [r for r in rows if r["checker"].startswith("onnxruntime")]
    assert len(ort_rows) == 35 and all(r["exact"] for r in rows)
    assert any(r["checker"] == "onnx.checker" and r["exact"] for r in rows)


def test_layout_qdq(exported):
    """int4/uint4 initializers, low nibble first, blocked DQ on axis 0 with block_size = group (formats.md §3.1)."""
    import onnx
    from onnx import numpy_helper

    out = exported("qdq-w4g32-asym")
    mp = onnx.load(str(out))
    assert mp.ir_version >= 10 and any(o.domain in ("", "ai.onnx") and o.version == 21 for o in mp.opset_import)
    ir = _ir(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    ql = ir.linears[name]
    inits = {t.name: t for t in mp.graph.initializer}
    x = inits[f"{name}.qweight"]
    assert x.data_type == onnx.TensorProto.UINT4 and list(x.dims) == [64, 64]
    raw = np.frombuffer(x.raw_data, np.uint8)
    q = ql.codes.numpy().T.reshape(-1)  # [K, N] row-major
    assert raw[0] == (q[0] | (q[1] << 4)) and np.array_equal(numpy_helper.to_array(x).astype(np.uint8), ql.codes.numpy().T)
    dq = next(n for n in mp.graph.node if n.name == f"{name}/DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    assert list(inits[f"{name}.scales"].dims) == [2, 64] and inits[f"{name}.scales"].data_type == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "MatMulNBits" for n in mp.graph.node)
    sym = onnx.load(str(exported("qdq-w4g32-sym")))
    t = {t.name: t for t in sym.graph.initializer}
    assert t[f"{name}.qweight"].data_type == onnx.TensorProto.INT4 and f"{name}.zero_points" not in t


def test_layout_matmulnbits(exported):
    import onnx

    mp = onnx.load(str(exported("mnb-w4g32-asym")))
    nodes = [n for n in mp.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 35 and all(n.domain == "com.microsoft" for n in nodes)
    inits = {t.name: t for t in mp.graph.initializer}
    down = next(n for n in nodes if n.name.startswith("model.layers.0.mlp.down_proj"))
    a = {x.name: x.i for x in down.attribute}
    # per-channel fallback (in-dim 172): one block size 128, K padded to 256, the row's scale repeated
    assert (a["K"], a["N"], a["bits"], a["block_size"]) == (172, 64, 4, 128)
    assert list(inits[down.input[1]].dims) == [64, 2, 64] and list(inits[down.input[3]].dims) == [64, 1]
    sym = onnx.load(str(exported("mnb-w4g32-sym")))
    assert all(len(n.input) == 3 for n in sym.graph.node if n.op_type == "MatMulNBits")  # default zero point 8


def test_fp16_scales_round_once(exported):
    """fp16 scales: DQ outputs fp16((q − z)·s); the check compares with the IR's weight rounded once to fp16."""
    import onnx

    out = exported("qdq-w4g32-asym-fp16scale")
    mp = onnx.load(str(out))
    scales = [t for t in mp.graph.initializer if t.name.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    assert sum(n.op_type == "Cast" and n.name.startswith("model.layers.") for n in mp.graph.node) == 35
    from kernels_check.onnx import check

    ir = _ir(out)
    rows = [r for r in check(out, ir) if r["tensor"] in ir.linears]
    assert len(rows) == 35 and all(r["exact"] for r in rows)  # exact against fp16(s·(q − z))
    w = ir.linears["model.layers.0.mlp.up_proj.weight"].dequant()
    assert not torch.equal(w.half().float(), w)  # and that rounding is real: fp32 s·(q − z) is not fp16-representable


@pytest.mark.parametrize("case", ["qdq-w4g32-asym", "qdq-w3g4-asym", "mnb-w4g32-asym", "mnb-w3g32-sym"])
def test_logits_match_fakequant_model(exported, case):
    from admmq_export.fakequant import model_from_ir
    from converters.onnx import OrtLM

    out = exported(case)
    ref = model_from_ir(_ir(out))
    lm = OrtLM(out)
    torch.manual_seed(0)
    for T in (1, 7, 96):
        ids = torch.randint(0, 512, (2, T))
        got = lm(ids, use_cache=False).logits
        with torch.no_grad():
            want = ref(ids, use_cache=False).logits
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _assert_decode_matches(lm, ref, vocab, n_prefill=10, n_decode=6):
    """Prefill with an empty cache, then decode token by token: each step's logits equal the no-cache run."""
    torch.manual_seed(1)
    seq = torch.randint(0, vocab, (1, n_prefill + n_decode))
    with torch.no_grad():
        want = ref(seq, use_cache=False).logits
    tol = 1e-4 * want.abs().max()
    logits, past = lm.step(seq[:, :n_prefill])
    assert (logits - want[:, :n_prefill]).abs().max() <= tol
    for t in range(n_prefill, n_prefill + n_decode):
        logits, past = lm.step(seq[:, t:t + 1], past)
        assert past[0].shape[2] == t + 1
        assert (logits[:, -1] - want[:, t]).abs().max() <= tol


@pytest.mark.parametrize("case", ["qdq-w4g32-asym", "mnb-w4g32-sym"])
def test_kv_cache_decode(exported, case):
    from admmq_export.fakequant import model_from_ir
    from converters.onnx import OrtLM

    out = exported(case)
    lm = OrtLM(out)
    assert len(lm.past) == 2 * 5 and lm.past[0].name == "past_key_values.0.key" and lm.present[1] == "present.0.value"
    _assert_decode_matches(lm, model_from_ir(_ir(out)), 512)


def _random_ir(model_type, **extra):
    """A tiny random model of `model_type`, RTN-quantized on int4 g32 asym, as an IR."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from admmq_export.grids import int_grid
    from admmq_export.ir import QuantizedLinear, QuantizedModel
    from converters.base import is_decoder_linear

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra)
    sd = AutoModelForCausalLM.from_config(cfg).state_dict()
    grid = int_grid("int", 4, 32, False)
    linears = {k: QuantizedLinear(grid, *grid.quantize_rtn(v.float())) for k, v in sd.items() if is_decoder_linear(k)}
    tensors = {k: v.float().clone() for k, v in sd.items() if k not in linears}
    return QuantizedModel(cfg.to_dict(), tensors, linears)


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # q/k norms
    ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_other_architectures(tmp_path, model_type, extra):
    from admmq_export.fakequant import model_from_ir
    from converters.onnx import OnnxConverter, OrtLM
    from kernels_check.onnx import check

    ir = _random_ir(model_type, **extra)
    out = tmp_path / "m.onnx"
    OnnxConverter().write(ir, out, None)
    rows = check(out, ir)
    assert len(rows) == 15 and all(r["exact"] for r in rows)
    if ir.config["tie_word_embeddings"]:  # gemma3: lm_head reads the embedding through a Transpose, no second copy
        import onnx

        mp = onnx.load(str(out))
        assert any(n.name == "lm_head/TiedTranspose" for n in mp.graph.node)
        assert not any(list(t.dims) == [64, 256] for t in mp.graph.initializer)
    _assert_decode_matches(OrtLM(out), model_from_ir(ir), 256, n_prefill=6, n_decode=6)  # past the sliding window


@pytest.mark.parametrize("case", ["qdq-w4g32-asym", "mnb-w4g32-sym"])
def test_perplexity_through_ort(exported, case, capsys):
    from admmq_export.fakequant import ir_path_for

    out = exported(case)
    capsys.readouterr()
    args = ["--data", str(TINY_TEXT), "--seqlen", "128", "--max-windows", "4", "--json"]
    assert main(["eval", str(out), *args]) == 0
    ours_ort = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(ir_path_for(out)), *args]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours_ort["windows"] == 4 and ours_ort["tokens"] == ours["tokens"]
    assert abs(ours_ort["ppl"] / ours["ppl"] - 1) < 0.005


@pytest.mark.parametrize("args,needle", [
    (["--to", "onnx:matmulnbits", "--group-size", "4"], "multiple of 16"),
    (["--to", "onnx:matmulnbits", "--onnx-scale-dtype", "fp16"], "fp16"),
    (["--to", "onnx:bogus"], "ONNX form"),
    (["--to", "ir", "--onnx-scale-dtype", "fp16"], "onnx-scale-dtype"),
])
def test_refusals(tmp_path, capsys, args, needle):
    out = tmp_path / "m.onnx"
    base = export_args(out)
    i = base.index("--to")
    del base[i:i + 2]
    j = base.index("--group-size") if "--group-size" in args else None
    if j is not None:
        del base[j:j + 2]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Fix:" in err
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))


def test_act_order_and_foreign_grids_refused():
    """Non-contiguous groups (act-order g_idx) and non-'int' grids cannot be written as blocked DQ / MatMulNBits."""
    from admmq_export.errors import UserError
    from admmq_export.grids import int_grid
    from admmq_export.ir import QuantizedLinear
    from converters.onnx_pack import pack_matmulnbits, pack_qdq

    torch.manual_seed(0)
    W = torch.randn(8, 64)
    grid = int_grid("int", 4, 32, True)
    codes, params = grid.quantize_rtn(W)
    g_idx = (torch.randperm(64) // 32).int()
    for pack in (pack_qdq, pack_matmulnbits):
        with pytest.raises(UserError, match="act-order"):
            pack("w", QuantizedLinear(grid, codes, params, g_idx))
        pack("w", QuantizedLinear(grid, codes, params, (torch.arange(64) // 32).int()))  # trivial g_idx is fine
    gptq = int_grid("gptq", 4, 32, True)
    with pytest.raises(UserError, match="kind 'int'"):
        pack_qdq("w", QuantizedLinear(gptq, *gptq.quantize_rtn(W)))


def test_external_data_and_unknown_arch(tmp_path, monkeypatch, capsys):
    """Above 2 GB the weights go to `<name>.data` beside the file (forced here by lowering the threshold)."""
    import converters.onnx as conv_onnx

    monkeypatch.setattr(conv_onnx, "TWO_GB", 0)
    out = tmp_path / "ext.onnx"
    assert main(export_args(out, "--asym", to="onnx:matmulnbits", bits=4, group=32)) == 0
    import onnx

    mp = onnx.load(str(out), load_external_data=False)
    ext = {t.name for t in mp.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "model.layers.0.mlp.up_proj.weight.B" in ext and (tmp_path / "ext.onnx.data").is_file()
    capsys.readouterr()
    assert main(["check", str(out)]) == 0
    assert conv_onnx.OrtLM(out)(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)

    from admmq_export.errors import UserError

    ir = _random_ir("qwen3")
    ir.config["model_type"] = "gpt2"
    with pytest.raises(UserError, match="not gpt2"):
        conv_onnx.OnnxConverter().write(ir, tmp_path / "x.onnx", None)

"""--to gguf: block packing read back bit-exactly by gguf-py and by llama.cpp's own ggml code, complete files that
llama.cpp loads and runs, presets and fallbacks, perplexity in llama.cpp vs our IR."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from admmq_export.cli import main
from admmq_export.grids import GGUF_GRIDS
from admmq_export.quantizers import get_quantizer
from conftest import TINY_TEXT, export_args
from converters.gguf_pack import pack
from kernels_check import ggml_ctypes

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python not installed (pip install '.[runtimes]')")


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[:, 7] *= 20  # an outlier column, so sub-block scales differ
    X = torch.randn(256, cols, generator=g)
    return W, 2 * X.T @ X / 256


@pytest.mark.parametrize("t", list(GGUF_GRIDS))
@pytest.mark.parametrize("method", ["rtn", "admmq"])
def test_packed_blocks_dequantize_bit_exactly(t, method):
    grid = GGUF_GRIDS[t]
    W, H = _problem(6, 512)
    res = get_quantizer(method)(W, H, grid)
    want = grid.dequant(res.codes, res.params).float()
    raw = pack(t, res.codes, res.params)
    qt = GGMLQuantizationType[t]
    got = np.asarray(dequantize(raw, qt), np.float32).reshape(want.shape)
    assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32)), "gguf-py disagrees"
    ok, why = ggml_ctypes.available()
    if ok:
        got = ggml_ctypes.dequantize(raw, qt, tuple(want.shape))
        assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32)), "llama.cpp's ggml disagrees"


@pytest.mark.skipif(not ggml_ctypes.available()[0], reason="llama-cpp-python's libggml not installed")
def test_ggml_traits_match_gguf_py():
    for t in GGUF_GRIDS:
        ggml_ctypes.traits(GGMLQuantizationType[t])


def _export(tmp_path, typ, method="rtn", *extra):
    out = tmp_path / f"s-{typ}-{method}.gguf"
    args = export_args(out, *extra, method=method, to=f"gguf:{typ}")
    assert main(args) == 0
    return out


@pytest.mark.parametrize("typ", ["q8_0", "q4_0", "q4_k_m", "q2_k", "q6_k", "f16"])
def test_stories_file_reads_back_exactly(tmp_path, typ, capsys):
    out = _export(tmp_path, typ)
    printed = capsys.readouterr().out
    r = GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "llama"
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    if typ != "f16":
        assert "fallback" in printed  # stories' in-dims 64/172 do not divide 256 (or 32): llama.cpp's fallbacks
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert all(r["exact"] for r in rows if r["status"] not in ("unavailable",))
    assert any(r["checker"].startswith("gguf-py Q") for r in rows) or typ == "f16"


def test_check_catches_a_tampered_file(tmp_path, capsys):
    out = _export(tmp_path, "q8_0")
    r = GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    off = int(t.data_offset)
    data = bytearray(out.read_bytes())
    data[off + 5] ^= 0x01  # one code bit of the first block
    out.write_bytes(bytes(data))
    assert main(["check", str(out)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_presets_follow_llamacpp_rules(tmp_path):
    from converters.gguf_presets import ModelInfo, parse, tensor_type

    info = ModelInfo("llama", 32, 32, 8, False)
    p = parse("q4_k_m")
    assert tensor_type(p, "blk.0.attn_v.weight", (1024, 4096), info)[0] == "Q6_K"  # use_more_bits(0)
    assert tensor_type(p, "blk.5.attn_v.weight", (1024, 4096), info)[0] == "Q4_K"
    assert tensor_type(p, "blk.0.attn_q.weight", (4096, 4096), info)[0] == "Q4_K"
    assert tensor_type(p, "output.weight", (32000, 4096), info)[0] == "Q6_K"
    assert tensor_type(parse("q2_k"), "blk.3.ffn_down.weight", (4096, 14336), info)[0] == "Q3_K"
    assert tensor_type(p, "blk.3.ffn_up.weight", (14336, 576), info) == (
        "Q5_0", "in-dim 576 not divisible by 256 (Q4_K): llama.cpp falls back to Q5_0")
    assert tensor_type(p, "blk.0.attn_norm.weight", (4096,), info)[0] == "F32"


def test_unknown_type_is_refused(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(export_args(out, to="gguf:q4_k_x")) != 0
    err = capsys.readouterr().err
    assert "unknown GGUF type" in err and "q4_k_m" in err
    assert not out.exists()


def test_quantizers_optimise_on_the_gguf_grid(tmp_path):
    """GPTQ/ADMM-Q exports to GGUF: the file holds their codes exactly and their objective beats RTN's."""
    obj = {}
    for method in ("rtn", "admmq"):
        out = tmp_path / f"{method}.gguf"
        rep = tmp_path / f"{method}.json"
        assert main(export_args(out, "--json-report", str(rep), method=method, to="gguf:q4_0")) == 0
        assert main(["check", str(out)]) == 0
        stats = json.loads(rep.read_text())["stats"]
        obj[method] = sum(s["objective"] for k, s in stats.items() if "layers" in k)
    assert obj["admmq"] < obj["rtn"]


@needs_llama
def test_llama_cpp_loads_and_generates(tmp_path):
    from llama_cpp import Llama

    out = _export(tmp_path, "q8_0")
    llm = Llama(model_path=str(out), n_ctx=128, verbose=False)
    text = llm("Once upon a time", max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


@needs_llama
@pytest.mark.parametrize("typ", ["q8_0", "q4_k_m"])
def test_llama_cpp_perplexity_matches_our_ir(tmp_path, typ, capsys):
    out = _export(tmp_path, typ)
    res = {}
    for target in (str(out), f"{out}.ir"):
        assert main(["eval", target, "--data", str(TINY_TEXT), "--protocol", "llamacpp", "--seqlen", "256",
                     "--max-windows", "6", "--json"]) == 0
        res[target] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    a, b = res.values()
    assert abs(a - b) / b < 0.01, res

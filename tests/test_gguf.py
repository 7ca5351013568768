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
from admmq_export.paths import shared
from conftest import export_args
from converters.gguf_pack import pack
from kernels_check import ggml_ctypes

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
WIKITEXT = shared("data", "wikitext2-test.txt")


def needs_llama(f):
    """Skip (with the reason) without llama-cpp-python; marked `runtime` (pyproject markers)."""
    skip = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python not installed (pip install '.[runtimes]')")
    return pytest.mark.runtime(skip(f))


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[:, 7] *= 20  # an outlier column, so sub-block scales differ
    X = torch.randn(256, cols, generator=g)
    return W, 2 * X.T @ X / 256


@pytest.mark.parametrize("t", list(GGUF_GRIDS))
@pytest.mark.parametrize("method", ["rtn", "admmq", "admmq+refit"])
def test_packed_blocks_dequantize_bit_exactly(t, method):
    """Each quantizer's codes and block fields (refitted ones included) pack to bytes that gguf-py and ggml decode
    to the grid's own dequantization, bit for bit."""
    grid = GGUF_GRIDS[t]
    W, H = _problem(6, 512)
    res = get_quantizer(method.split("+")[0])(W, H, grid, refit=method.endswith("refit"))
    if method.endswith("refit"):
        assert "f_refit" in res.stats
    want = grid.dequant(res.codes, res.params).float()
    raw = pack(t, res.codes, res.params)
    qt = GGMLQuantizationType[t]
    got = np.asarray(dequantize(raw, qt), np.float32).reshape(want.shape)
    assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32)), "gguf-py disagrees"
    ok, why = ggml_ctypes.available()
    if ok:
        got = ggml_ctypes.dequantize(raw, qt, tuple(want.shape))
        assert np.array_equal(got.view(np.int32), want.numpy().view(np.int32)), "llama.cpp's ggml disagrees"


def _extreme_params(grid, R, U, g):
    """Block fields over their whole stored range: fp16 d of both signs, zero and subnormal, sub-scales/mins at
    and between their limits (what no RTN fit is guaranteed to produce, but GPTQ/ADMM-Q refits may)."""
    def half(*shape):
        x = torch.randn(*shape, generator=g) * 0.01
        x.view(-1)[:4] = torch.tensor([0.0, -0.0, 6e-8, -65504.0])[: x.numel()]
        return x.to(torch.float16)

    p = {"d": half(R, U, 1)}
    if "Q4_1" in grid.ggml_type or "Q5_1" in grid.ggml_type:
        p["m"] = half(R, U, 1)
    if grid.sub_size:
        n, lo, hi = grid.group_size // grid.sub_size, getattr(grid, "sc_lo", 0), getattr(grid, "sc_hi", getattr(grid, "sc_max", 0))
        sc = torch.randint(lo, hi + 1, (R, U, n), generator=g)
        sc.view(-1)[:2] = torch.tensor([lo, hi])
        p["sc"] = sc.to(torch.int8 if lo < 0 else torch.uint8)
        if hasattr(grid, "sc_max"):
            p["dmin"] = half(R, U, 1)
            m = torch.randint(0, grid.sc_max + 1, (R, U, n), generator=g)
            m.view(-1)[:2] = torch.tensor([grid.sc_max, 0])
            p["m"] = m.to(torch.uint8)
    return p


@pytest.mark.parametrize("t", list(GGUF_GRIDS))
def test_packer_covers_every_bit_of_the_block(t):
    """Random codes over [0, qmax] and block fields at their range limits: gguf-py and ggml decode the packed
    bytes to exactly the grid's own dequantization (signed zeros included)."""
    grid = GGUF_GRIDS[t]
    g = torch.Generator().manual_seed(1)
    R, C = 4, 2 * grid.group_size if grid.group_size == 256 else 256
    codes = torch.randint(0, grid.qmax + 1, (R, C), generator=g).to(torch.uint8)
    codes[0, :2] = torch.tensor([0, grid.qmax])
    params = _extreme_params(grid, R, C // grid.group_size, g)
    want = grid.dequant(codes, params).float().numpy()
    raw = pack(t, codes, params)
    qt = GGMLQuantizationType[t]
    got = np.asarray(dequantize(raw, qt), np.float32).reshape(want.shape)
    assert np.array_equal(got.view(np.int32), want.view(np.int32)), "gguf-py disagrees"
    if ggml_ctypes.available()[0]:
        got = ggml_ctypes.dequantize(raw, qt, want.shape)
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), "llama.cpp's ggml disagrees"


@pytest.mark.skipif(not ggml_ctypes.available()[0], reason="llama-cpp-python's libggml not installed")
def test_ggml_traits_match_gguf_py():
    for t in GGUF_GRIDS:
        ggml_ctypes.traits(GGMLQuantizationType[t])


def _export(tmp_path, typ, method="rtn", *extra):
    out = tmp_path / f"s-{typ}-{method}.gguf"
    args = export_args(out, *extra, method=method, to=f"gguf:{typ}")
    assert main(args) == 0
    return out


# stories' in-dims (64, 172) put every K type through llama.cpp's fallbacks: together these presets write
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16 BF16 F32 tensors (the K blocks themselves: test_packed_blocks_dequantize_bit_exactly)
@pytest.mark.parametrize("typ", ["q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q3_k_l", "q2_k", "q6_k", "f16", "bf16"])
def test_stories_file_reads_back_exactly(tmp_path, typ, capsys):
    out = _export(tmp_path, typ)
    printed = capsys.readouterr().out
    r = GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "llama"
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    if typ not in ("f16", "bf16"):
        assert "fallback" in printed  # stories' in-dims 64/172 do not divide 256 (or 32): llama.cpp's fallbacks
    assert main(["check", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert all(r["exact"] for r in rows if r["status"] not in ("unavailable",))
    assert any(r["checker"].startswith("gguf-py Q") for r in rows) or typ in ("f16", "bf16")


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
    """GPTQ/ADMM-Q exports to GGUF: the file holds their codes exactly and their objective beats RTN's; with
    --refit (Q4_0's fp16 d refitted per block) the file still reads back exactly and the objective does not rise."""
    obj = {}
    for name, method, extra in (("rtn", "rtn", ()), ("admmq", "admmq", ()), ("refit", "admmq", ("--refit",))):
        out = tmp_path / f"{name}.gguf"
        rep = tmp_path / f"{name}.json"
        assert main(export_args(out, "--json-report", str(rep), *extra, method=method, to="gguf:q4_0")) == 0
        assert main(["check", str(out)]) == 0
        stats = json.loads(rep.read_text())["stats"]
        obj[name] = sum(s["objective"] for k, s in stats.items() if "layers" in k)
    assert obj["admmq"] < obj["rtn"]
    assert obj["refit"] <= obj["admmq"]


@needs_llama
def test_llama_cpp_loads_and_generates(tmp_path):
    from llama_cpp import Llama

    out = _export(tmp_path, "q8_0")
    llm = Llama(model_path=str(out), n_ctx=128, verbose=False)
    text = llm("Once upon a time", max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


@needs_llama
def test_llama_cpp_perplexity_matches_our_ir(tmp_path, capsys):
    """llama.cpp's perplexity (its protocol: ctx 512, second half of each chunk scored) of the written file on
    wikitext-2 test is within 1% of our fake-quant evaluation of the IR beside it."""
    out = _export(tmp_path, "q4_k_m")
    data = tmp_path / "wikitext2-head.txt"  # the file's first 40k characters: 3 windows of 512 tokens, fast
    data.write_text(WIKITEXT.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    res = {}
    for target in (str(out), f"{out}.ir"):
        assert main(["eval", target, "--data", str(data), "--protocol", "llamacpp", "--seqlen", "512",
                     "--max-windows", "3", "--json"]) == 0
        res[target] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = (r["ppl"] for r in res.values())
    assert all(r["windows"] == 3 for r in res.values()), res
    assert abs(a - b) / b < 0.01, res


def _synthetic_ir(stories, hidden, ffn, heads, kv_heads, tied, n_layer=16):
    """A float IR of an n_layer llama with the given in-dims; 2-D tensors have only 2·heads rows (the type rules
    read names, layer indices, head counts and in-dims, never the row count), so llama.cpp quantizes it in ms."""
    from admmq_export.ir import QuantizedModel

    cfg = {**stories.model.config.to_dict(), "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": n_layer,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
           "tie_word_embeddings": tied}
    rows = 2 * heads
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (rows, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (rows, hidden)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        shapes.update({p + f"self_attn.{k}_proj.weight": (rows, hidden) for k in "qkvo"})
        shapes.update({p + f"mlp.{k}_proj.weight": (rows, hidden) for k in ("gate", "up")})
        shapes[p + "mlp.down_proj.weight"] = (rows, ffn)
    tensors = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    return QuantizedModel(cfg, tensors, {}, {}, gguf_tokenizer=stories.gguf_tokenizer)


def _llama_quantize(src, dst, ftype, pure):
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = int(ftype), pure, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return {t.name: t.tensor_type.name for t in GGUFReader(str(dst)).tensors}


@needs_llama
@pytest.mark.parametrize("dims", [(256, 512, 8, 2, False), (576, 1536, 9, 3, True)], ids=["256-untied-gqa4", "576-tied-gqa3"])
def test_plan_matches_llama_quantize_per_tensor(tmp_path, stories, dims):
    """For every preset, the type our plan gives each tensor (what the quantizers optimise on and the file holds)
    is the type llama.cpp's own `llama_model_quantize` picks for the same model: preset rules by layer and head
    counts, token_embd/output, tied embeddings, --pure, and the shape fallbacks (576 = 2.25 x 256)."""
    from converters import get_converter
    from converters.base import QuantOptions
    from converters.gguf_layout import gguf_name
    from converters.gguf_meta import model_info
    from converters.gguf_presets import PRESETS, PURE_TYPES, parse, tensor_type

    conv, _ = get_converter("gguf")
    ir = _synthetic_ir(stories, *dims)
    src = tmp_path / "f32.gguf"
    conv.write(ir, src, "f32")
    info = model_info(ir.config)
    for name in [n for n in PRESETS if n not in ("f32", "f16", "bf16")] + list(PURE_TYPES) + ["q2_k-pure", "q6_k-pure"]:
        p = parse(name)
        theirs = _llama_quantize(src, tmp_path / f"{name}.gguf", p.ftype, p.pure)
        plan = conv.planned(name, QuantOptions(), config=ir.config)
        ours = {}
        for hf, x in ir.tensors.items():
            g = gguf_name(hf, ir.config)
            grid = plan(hf, tuple(x.shape))
            ours[g] = grid.ggml_type if grid is not None else tensor_type(p, g, tuple(x.shape), info)[0]
        assert ours == theirs, (name, {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v})


_ARCH_CONFIGS = {  # tiny random models, one per architecture the writer supports (gemma3: sliding window 8 < 40 tokens)
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "tie_word_embeddings": True}),
}


@needs_llama
@pytest.mark.parametrize("arch", list(_ARCH_CONFIGS))
def test_llama_cpp_runs_each_architecture_like_transformers(tmp_path, stories, arch):
    """The metadata, tensor names and layout changes (llama's Q/K row order, gemma3's norm + 1, qwen2's biases,
    qwen3's q/k norms, tied embeddings) are what llama.cpp expects: its logits for a tiny random model written as
    gguf:f32 equal transformers' to fp32 accumulation-order noise (a missing permutation or norm shift is ~0.5)."""
    import transformers

    from admmq_export.ir import QuantizedModel
    from converters import get_converter
    from converters.gguf import LlamaCppLM

    cls, extra = _ARCH_CONFIGS[arch]
    cfg = getattr(transformers, cls)(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # norms away from their init, so a wrong norm layout shows
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    ir = QuantizedModel(model.config.to_dict(), sd, {}, {}, gguf_tokenizer=stories.gguf_tokenizer)
    out = tmp_path / f"{arch}.gguf"
    get_converter("gguf")[0].write(ir, out, "f32")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 1
    got = LlamaCppLM(out, n_ctx=16, threads=1)(ids).logits  # 40 tokens: the runner grows its context
    with torch.no_grad():
        want = model(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 2e-3 * want.abs().max().item(), (arch, err)

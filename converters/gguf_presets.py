"""GGUF tensor types per tensor: llama.cpp's presets (`llama-quantize` ftypes) and its shape fallbacks.

This is a port of `llama_tensor_get_type` / `tensor_type_fallback` in llama.cpp's src/llama-quant.cpp (the
copy vendored in llama-cpp-python 0.3.36), restricted to the types we write (no IQ*, no MoE/Falcon rules):

* Which tensors are quantized: 2-D `*.weight` tensors except norms (`*_norm.weight`); 1-D tensors stay F32.
* Default type per preset: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 -> itself; Q2_K -> Q2_K; Q3_K_S/M/L -> Q3_K;
  Q4_K_S/M -> Q4_K; Q5_K_S/M -> Q5_K; Q6_K -> Q6_K; F16/BF16/F32 -> itself (nothing quantized).
* `output.weight`, and `token_embd.weight` when the embeddings are tied: Q8_0 if its in-dim is not a multiple
  of the default type's block, else Q6_K unless the default type is Q8_0 (then Q8_0).
  An untied `token_embd.weight` keeps the default type.
* `attn_v` (layer i of n, `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`):
  Q2_K -> Q4_K if n_head/n_head_kv >= 4 else Q3_K;  Q3_K_M -> Q5_K for i < 2 else Q4_K;  Q3_K_L -> Q5_K;
  Q4_K_M/Q5_K_M -> Q6_K where use_more_bits;  Q4_K_S -> Q5_K for i < 4;  then, for a 70B model
  (llama: 80 layers with GQA; qwen2: 80 layers), Q3_K/Q4_K -> Q5_K.
* `ffn_down` (layer i of n): Q2_K -> Q3_K;  Q3_K_M -> Q5_K for i < n/16 else Q4_K;  Q3_K_L -> Q5_K;
  Q4_K_M -> Q6_K where use_more_bits;  Q5_K_M -> Q6_K where use_more_bits;  Q4_K_S -> Q5_K for i < n/8;
  Q4_0/Q5_0 *with an importance matrix* -> Q4_1/Q5_1 for i < n/8 (off here: `has_imatrix=False`).
* `attn_output`: Q2_K -> Q3_K;  Q3_K_M -> Q4_K;  Q3_K_L -> Q5_K.  (attn_q/attn_k/ffn_gate/ffn_up: default.)
* Fallback when the in-dim (ne[0]) is not a multiple of the chosen type's block: Q2_K/Q3_K -> Q4_0,
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; a 32-block type stays; if the result still does not divide,
  F16 ("must use F16 due to unusual shape"). Every fallback is reported.

Single types that are not llama.cpp presets (`q3_k`, `q4_k`, `q5_k`) and any name with a `-pure` suffix
(`q4_k_m-pure` is meaningless; `q6_k-pure`, `q4_0-pure`) follow `llama-quantize --pure`: every quantizable
tensor gets the default type (fallbacks still apply).
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from admmq_export.errors import UserError

FT = LlamaFileType
# preset -> (file type written as general.file_type, default tensor type)
PRESETS: dict[str, tuple[LlamaFileType, str]] = {
    "f32": (FT.ALL_F32, "F32"), "f16": (FT.MOSTLY_F16, "F16"), "bf16": (FT.MOSTLY_BF16, "BF16"),
    "q4_0": (FT.MOSTLY_Q4_0, "Q4_0"), "q4_1": (FT.MOSTLY_Q4_1, "Q4_1"), "q5_0": (FT.MOSTLY_Q5_0, "Q5_0"),
    "q5_1": (FT.MOSTLY_Q5_1, "Q5_1"), "q8_0": (FT.MOSTLY_Q8_0, "Q8_0"),
    "q2_k": (FT.MOSTLY_Q2_K, "Q2_K"),
    "q3_k_s": (FT.MOSTLY_Q3_K_S, "Q3_K"), "q3_k_m": (FT.MOSTLY_Q3_K_M, "Q3_K"), "q3_k_l": (FT.MOSTLY_Q3_K_L, "Q3_K"),
    "q4_k_s": (FT.MOSTLY_Q4_K_S, "Q4_K"), "q4_k_m": (FT.MOSTLY_Q4_K_M, "Q4_K"),
    "q5_k_s": (FT.MOSTLY_Q5_K_S, "Q5_K"), "q5_k_m": (FT.MOSTLY_Q5_K_M, "Q5_K"),
    "q6_k": (FT.MOSTLY_Q6_K, "Q6_K"),
}
# single K types without a preset of their own: pure, with the file type of their nearest preset
PURE_TYPES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
FLOAT_TYPES = ("F32", "F16", "BF16")
TYPE_NAMES = [*PRESETS, *PURE_TYPES]
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Preset:
    name: str
    ftype: LlamaFileType
    default: str  # default tensor type, e.g. "Q4_K"
    pure: bool = False

    @property
    def is_float(self) -> bool:
        return self.default in FLOAT_TYPES


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters llama.cpp's type rules look at."""

    arch: str  # gguf arch name: llama, qwen2, qwen3, gemma3
    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        return self.n_layer == 80 and (self.arch == "qwen2" or (self.arch == "llama" and self.n_head != self.n_head_kv))


def parse(typ: str | None) -> Preset:
    name = (typ or "q4_k_m").lower()
    pure = name.endswith("-pure")
    base = name[: -len("-pure")] if pure else name
    if base in PURE_TYPES:
        ftype, default = PRESETS[PURE_TYPES[base]][0], base.upper()
        return Preset(name, ftype, default, True)
    if base not in PRESETS:
        raise UserError(f"unknown GGUF type {typ!r}",
                        f"use --to gguf:TYPE with TYPE one of {', '.join(TYPE_NAMES)} (optionally with -pure)")
    ftype, default = PRESETS[base]
    return Preset(name, ftype, default, pure)


def block_size(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def is_quantizable(gguf_name: str, ndim: int) -> bool:
    """llama.cpp's `tensor_allows_quantization` for the tensors of our architectures."""
    return ndim >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key.split(".")[0]
    return "other"


def _mixture_type(p: Preset, name: str, ne0: int, info: ModelInfo, has_imatrix: bool) -> str:
    """llama_tensor_get_type_impl for the presets above."""
    f, t = p.name, p.default
    cat = _category(name)
    i, n = _layer(name), info.n_layer
    if cat == "output" or (info.tied and cat == "token_embd"):
        if ne0 % block_size(t):
            return "Q8_0"
        return t if t == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        if f == "q2_k":
            t = "Q4_K" if info.n_gqa >= 4 else "Q3_K"
        elif f == "q3_k_m":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif f == "q3_k_l":
            t = "Q5_K"
        elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            t = "Q6_K"
        elif f == "q4_k_s" and i < 4:
            t = "Q5_K"
        if info.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
    elif cat == "ffn_down":
        if f == "q2_k":
            t = "Q3_K"
        elif f == "q3_k_m":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif f == "q3_k_l":
            t = "Q5_K"
        elif f in ("q4_k_m", "q5_k_m"):
            if _use_more_bits(i, n):
                t = "Q6_K"
        elif f == "q4_k_s" and i < n // 8:
            t = "Q5_K"
        elif f in ("q4_0", "q5_0") and has_imatrix and i < n // 8:
            t = "Q4_1" if f == "q4_0" else "Q5_1"
    elif cat == "attn_output":
        t = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(f, t)
    return t


def fallback_type(t: str, ne0: int) -> str:
    """tensor_type_fallback: the type llama.cpp uses when ne0 is not a multiple of t's block."""
    if t in FLOAT_TYPES or ne0 % block_size(t) == 0:
        return t
    r = FALLBACK.get(t, t)
    return r if ne0 % block_size(r) == 0 else "F16"


def tensor_type(p: Preset, gguf_name: str, shape: tuple, info: ModelInfo, has_imatrix: bool = False) -> tuple[str, str | None]:
    """(GGUF type of one tensor, fallback note or None). `shape` is the HF/numpy shape ([out, in] for weights)."""
    if not is_quantizable(gguf_name, len(shape)):
        return "F32", None
    if p.is_float:
        return p.default, None
    ne0 = int(shape[-1])
    t = p.default if p.pure else _mixture_type(p, gguf_name, ne0, info, has_imatrix)
    r = fallback_type(t, ne0)
    note = None if r == t else f"in-dim {ne0} not divisible by {block_size(t)} ({t}): llama.cpp falls back to {r}"
    return r, note

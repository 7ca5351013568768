"""GGUF metadata: architecture hyper-parameters with the exact key types llama.cpp checks, and the tokenizer.

Keys and value types follow convert_hf_to_gguf.py (TextModel.set_gguf_parameters, LlamaModel, Qwen2/3Model,
Gemma3Model) through the `gguf` package's writer methods, which carry the types (UINT32 lengths/counts,
FLOAT32 eps/rope base, BOOL flags). The tokenizer is copied from the source GGUF (`ir.gguf_tokenizer`) with
the types llama.cpp expects per key, or built from the Hugging Face tokenizer files (`ir.tokenizer_dir`):
GPT-2 byte-level BPE (`gpt2`, with `pre` recognised from tokenizer.json's pre-tokenizer) or SentencePiece
(`llama`, from tokenizer.model or a byte-fallback tokenizer.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFValueType as VT
from gguf import GGUFWriter, TokenType

from admmq_export.errors import UserError

from .gguf_presets import ModelInfo

# HF model_type -> GGUF architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3"}
QUANT_VERSION = 2  # GGML_QNT_VERSION


def gguf_arch(config: dict) -> str:
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise UserError(f"GGUF export does not support architecture {mt!r}",
                        f"use a model of one of: {', '.join(sorted(set(ARCHS)))}")
    return ARCHS[mt]


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def model_info(config: dict) -> ModelInfo:
    heads = int(config["num_attention_heads"])
    return ModelInfo(arch=gguf_arch(config), n_layer=int(config["num_hidden_layers"]), n_head=heads,
                     n_head_kv=int(config.get("num_key_value_heads") or heads),
                     tied=bool(config.get("tie_word_embeddings", False)))


def _rope(config: dict) -> tuple[dict, dict]:
    """(full-attention rope parameters, sliding-attention ones) from transformers 5 `rope_parameters` or the
    older `rope_theta`/`rope_scaling` keys."""
    rp = config.get("rope_parameters")
    if not rp:
        rp = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
        if config.get("rope_local_base_freq"):
            rp = {"full_attention": rp, "sliding_attention": {"rope_theta": config["rope_local_base_freq"]}}
    return rp.get("full_attention", rp), rp.get("sliding_attention", {})


def add_hparams(w: GGUFWriter, config: dict, arch: str, file_type: int, quantized: bool, name: str | None) -> None:
    c = config
    if name:
        w.add_name(name)
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_context_length(int(c.get("max_position_embeddings") or 2048))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    hd = head_dim(c)
    w.add_key_length(hd)
    w.add_value_length(hd)
    full, swa = _rope(c)
    if full.get("rope_theta") is not None:
        w.add_rope_freq_base(float(full["rope_theta"]))
    rtype = (full.get("rope_type") or full.get("type") or "default").lower()
    if rtype == "linear" and full.get("factor"):
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    elif rtype not in ("default", "none"):
        raise UserError(f"rope scaling {rtype!r} is not supported by the GGUF writer yet",
                        "export a model without rope scaling, or to another format")
    if arch == "llama":
        w.add_vocab_size(int(c["vocab_size"]))
        w.add_rope_dimension_count(hd)
    if arch == "gemma3":
        if swa.get("rope_theta") is not None:
            w.add_rope_freq_base_swa(float(swa["rope_theta"]))
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        if c.get("sliding_window"):
            w.add_sliding_window(int(c["sliding_window"]))
            types = c.get("layer_types")
            if types:
                is_swa = [t == "sliding_attention" for t in types]
                if is_swa != [(i + 1) % 6 != 0 for i in range(len(types))]:  # llama.cpp's default pattern is 6
                    w.add_sliding_window_pattern(is_swa)
    w.add_file_type(int(file_type))
    if quantized:
        w.add_quantization_version(QUANT_VERSION)


# ---- tokenizer ------------------------------------------------------------------------------------------
_KV_TYPES: dict[str, tuple[VT, VT | None]] = {
    "tokenizer.ggml.model": (VT.STRING, None), "tokenizer.ggml.pre": (VT.STRING, None),
    "tokenizer.ggml.tokens": (VT.ARRAY, VT.STRING), "tokenizer.ggml.merges": (VT.ARRAY, VT.STRING),
    "tokenizer.ggml.token_type": (VT.ARRAY, VT.INT32), "tokenizer.ggml.scores": (VT.ARRAY, VT.FLOAT32),
    "tokenizer.ggml.precompiled_charsmap": (VT.ARRAY, VT.UINT8),
    "tokenizer.ggml.token_type_count": (VT.UINT32, None),
    "tokenizer.chat_template": (VT.STRING, None), "tokenizer.huggingface.json": (VT.STRING, None),
}


def kv_type(key: str, value) -> tuple[VT, VT | None]:
    """The value type llama.cpp expects for a tokenizer.* key (ids UINT32, add_* flags BOOL, ...)."""
    if key in _KV_TYPES:
        return _KV_TYPES[key]
    if key.endswith("_token_id"):
        return VT.UINT32, None
    if key.startswith("tokenizer.ggml.add_") or key == "tokenizer.ggml.remove_extra_whitespaces":
        return VT.BOOL, None
    if isinstance(value, bool):
        return VT.BOOL, None
    if isinstance(value, int):
        return VT.UINT32, None
    if isinstance(value, float):
        return VT.FLOAT32, None
    if isinstance(value, str):
        return VT.STRING, None
    if isinstance(value, list) and value:
        first = value[0]
        sub = VT.STRING if isinstance(first, str) else VT.FLOAT32 if isinstance(first, float) else VT.INT32
        return VT.ARRAY, sub
    raise UserError(f"cannot type tokenizer key {key} = {value!r:.40}", "re-export from the original model")


def add_gguf_tokenizer(w: GGUFWriter, tok: dict) -> None:
    """Copy the source GGUF's tokenizer.* key/values with their expected types."""
    for key, value in tok.items():
        if isinstance(value, list) and not value:
            continue
        vt, sub = kv_type(key, value)
        if vt == VT.ARRAY and sub == VT.FLOAT32:
            value = [float(v) for v in value]
        elif vt == VT.ARRAY and sub == VT.INT32:
            value = [int(v) for v in value]
        w.add_key_value(key, value, vt, sub_type=sub)


def _pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, recognised from its pre-tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regex = [s.get("pattern", {}).get("Regex", "") for s in steps if s.get("type") == "Split"]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if regex and "\\p{N}{1,3}" in regex[0] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex[0]:
        return "llama-bpe"
    if regex and "\\p{N}" in regex[0] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex[0]:
        return "qwen2"
    raise UserError(f"unrecognised BPE pre-tokenizer {kinds} {regex[:1]}",
                    "export from the model's GGUF file, which carries llama.cpp's pre-tokenizer name")


def _gpt2_vocab(w: GGUFWriter, d: Path) -> int:
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    n = max([*vocab.values(), *added.keys()]) + 1
    rev = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        elif i in rev:
            tokens.append(rev[i])
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    return n


def _spm_vocab(w: GGUFWriter, d: Path) -> int:
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    v = SentencePieceVocab(d) if (d / "tokenizer.model").is_file() else LlamaHfVocab(d)
    tokens, scores, types = [], [], []
    for text, score, ttype in v.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return len(tokens)


def add_hf_tokenizer(w: GGUFWriter, d: Path) -> None:
    """Tokenizer metadata from Hugging Face tokenizer files (what convert_hf_to_gguf does, for BPE and SPM)."""
    from gguf.vocab import SpecialVocab

    tj_path = d / "tokenizer.json"
    model = json.loads(tj_path.read_text(encoding="utf-8"))["model"] if tj_path.is_file() else {}
    if (d / "tokenizer.model").is_file() or model.get("byte_fallback"):
        n = _spm_vocab(w, d)
        merges = False
    elif model.get("type") == "BPE":
        n = _gpt2_vocab(w, d)
        merges = True
    else:
        raise UserError(f"no supported tokenizer in {d} (need a BPE tokenizer.json or tokenizer.model)",
                        "export from the model's GGUF file instead")
    SpecialVocab(d, load_merges=merges, n_vocab=n).add_to_gguf(w, quiet=True)


def add_tokenizer(w: GGUFWriter, gguf_tokenizer: dict | None, tokenizer_dir: Path | None) -> str:
    if gguf_tokenizer:
        add_gguf_tokenizer(w, gguf_tokenizer)
        return "copied from the source GGUF"
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        add_hf_tokenizer(w, Path(tokenizer_dir))
        return f"built from {Path(tokenizer_dir).name}/"
    raise UserError("the IR has no tokenizer to embed", "re-run the export (it saves the tokenizer)")

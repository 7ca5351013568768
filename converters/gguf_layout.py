"""HF tensor -> GGUF tensor: the name (gguf-py's tensor name map) and the value layout changes llama.cpp needs.

* arch `llama` (Llama, Mistral): `attn_q`/`attn_k` rows (and biases) are permuted from HF's rotate-half order to
  llama.cpp's interleaved RoPE order, `w.reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2)` exactly as
  convert_hf_to_gguf's `LlamaModel.permute` (n_head for q, n_head_kv for k). The permutation moves whole rows,
  so a quantized tensor's packed block rows move with it (codes and block fields together); transformers'
  GGUF loader applies the inverse on load.
* arch `gemma3`: every `*norm.weight` is stored as `w + 1` (fp32), since Gemma3RMSNorm multiplies by (1 + w)
  and llama.cpp by the stored value (convert_hf_to_gguf `Gemma3Model.norm_shift`).
* qwen2/qwen3: no change.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
from gguf import MODEL_ARCH, get_tensor_name_map

from .gguf_meta import gguf_arch


@lru_cache(maxsize=16)
def _name_map(arch: str, n_blocks: int):
    return get_tensor_name_map(MODEL_ARCH[arch.upper()], n_blocks)


def gguf_name(hf_name: str, config: dict) -> str | None:
    """GGUF tensor name for an HF state-dict name (None: not a tensor of this architecture's GGUF)."""
    return _name_map(gguf_arch(config), int(config["num_hidden_layers"])).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def layer_index(gguf_name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(m.group(1)) if m else -1


def llama_row_permutation(rows: int, n_head: int) -> np.ndarray:
    """Source row of each destination row for convert_hf_to_gguf's `LlamaModel.permute`."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def row_permutation(gname: str, rows: int, config: dict) -> np.ndarray | None:
    if gguf_arch(config) != "llama":
        return None
    heads = int(config["num_attention_heads"])
    if re.search(r"\.attn_q\.(weight|bias)$", gname):
        return llama_row_permutation(rows, heads)
    if re.search(r"\.attn_k\.(weight|bias)$", gname):
        return llama_row_permutation(rows, int(config.get("num_key_value_heads") or heads))
    return None


def norm_shift(gname: str, config: dict) -> float:
    return 1.0 if gguf_arch(config) == "gemma3" and gname.endswith("norm.weight") else 0.0


def to_file_layout(gname: str, x: torch.Tensor, config: dict) -> torch.Tensor:
    """An fp32 HF tensor (or dequantized weight) in the layout and values the GGUF file holds."""
    x = x.float()
    shift = norm_shift(gname, config)
    if shift:
        x = x + shift
    perm = row_permutation(gname, x.shape[0], config)
    if perm is not None:
        x = x[torch.from_numpy(perm)]
    return x.contiguous()


def ordered_names(names, config: dict) -> list[tuple[str, str]]:
    """(hf, gguf) pairs in llama.cpp's loader order (by layer, then name); unknown names are left out."""
    pairs = [(n, gguf_name(n, config)) for n in names]
    pairs = [(h, g) for h, g in pairs if g is not None]
    return sorted(pairs, key=lambda p: (layer_index(p[1]), p[1]))

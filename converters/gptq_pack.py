"""GPTQ int32 packing (formats.md §2.1): codes packed along K (qweight [K·bits/32, N]), zero points along N
(qzeros [G, N·bits/32]). For every bit width the words form one little-endian bit stream: value i of a column
occupies stream bits [bits·i, bits·i + bits) — for 2/4/8 bits that is "row r·pf+i at bits bits·i" of word r, and
for 3 bits exactly AutoGPTQ's three-word layout (value 10 split 2+1 bits across words A/B, value 21 1+2 across
B/C). `unpack` is the independent inverse the checker and the loader use."""
from __future__ import annotations

import numpy as np


def pack_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """uint values [K, N] (< 2^bits) -> int32 [K·bits/32, N], packed along axis 0."""
    v = np.asarray(v).astype(np.uint8)
    K, N = v.shape
    if (K * bits) % 32:
        raise ValueError(f"{K} values of {bits} bits do not fill whole 32-bit words")
    if v.size and int(v.max()) >= 1 << bits:
        raise ValueError(f"a value exceeds {bits} bits")
    b = ((v[:, None, :] >> np.arange(bits, dtype=np.uint8)[None, :, None]) & 1).astype(np.uint8)  # [K, bits, N]
    words = np.packbits(b.reshape(K * bits // 32, 32, N), axis=1, bitorder="little")  # [W, 4, N] bytes
    return np.ascontiguousarray(words.transpose(0, 2, 1)).view("<u4").reshape(K * bits // 32, N).view(np.int32)


def unpack_rows(w: np.ndarray, bits: int) -> np.ndarray:
    """int32 [W, N] -> uint8 values [W·32/bits, N] (inverse of pack_rows)."""
    w = np.ascontiguousarray(np.asarray(w).astype(np.int32))
    W, N = w.shape
    by = w.view(np.uint8).reshape(W, N, 4).transpose(0, 2, 1)  # [W, 4, N]
    b = np.unpackbits(np.ascontiguousarray(by), axis=1, bitorder="little")  # [W, 32, N]
    b = b.reshape(W * 32 // bits, bits, N).astype(np.uint8)
    return (b << np.arange(bits, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)


def pack_cols(v: np.ndarray, bits: int) -> np.ndarray:
    """uint values [G, N] -> int32 [G, N·bits/32], packed along axis 1 (qzeros)."""
    return np.ascontiguousarray(pack_rows(np.asarray(v).T, bits).T)


def unpack_cols(w: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(unpack_rows(np.asarray(w).T, bits).T)

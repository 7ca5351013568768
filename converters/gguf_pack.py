"""Pack the IR's codes and GGUF block fields into ggml block bytes, verbatim (formats.md §1.5).

Nothing is re-rounded: the codes are the grid's integer codes and the parameters are the block fields the
GGUF grids store (fp16 `d`/`m`/`dmin`, integer sub-scales), so packing only moves bits. All work is
vectorised numpy over every block of the tensor at once.

`pack(ggml_type, codes[R, C] uint8, params{k: [R, n_units, j]}) -> uint8 [R, C/block * type_size]`.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 32
QK_K = 256


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def _half(p: np.ndarray, n: int) -> np.ndarray:
    """fp16 block field -> its 2 little-endian bytes per block, [n, 2]. Refuses anything but fp16."""
    if p.dtype != np.float16:
        raise TypeError(f"GGUF fp16 block field has dtype {p.dtype}")
    return np.ascontiguousarray(p.reshape(n)).view(np.uint8).reshape(n, 2)


def _small(p: np.ndarray, n: int, k: int, lo: int, hi: int, what: str) -> np.ndarray:
    """Integer sub-scales [n, k] as int64, range-checked (a value out of range would be silently truncated)."""
    v = p.reshape(n, k).astype(np.int64)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"{what} out of range [{lo}, {hi}]: [{v.min()}, {v.max()}]")
    return v


def _or_shifted(parts: np.ndarray, axis: int, step: int) -> np.ndarray:
    """Σ_i parts[..., i, ...] << (step·i) along `axis` (disjoint bit fields), as uint8."""
    parts = np.moveaxis(parts.astype(np.uint16), axis, 0)
    out = np.zeros(parts.shape[1:], np.uint16)
    for i, p in enumerate(parts):
        out |= p << (step * i)
    return out.astype(np.uint8)


def _nibbles32(q: np.ndarray) -> np.ndarray:
    """[n, 32] 4-bit values -> qs[16]: low nibble element j, high nibble element j+16."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _bit4_u32(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit values -> qh[4]: little-endian u32 whose bit e is bit 4 of element e."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _crumbs256(q2: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> qs[64]: qs[32h+l] bits 2s..2s+1 = element 128h+32s+l (Q2_K/Q3_K)."""
    return _or_shifted(q2.reshape(-1, 2, 4, 32), axis=2, step=2).reshape(-1, 64)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes `get_scale_min_k4` reads."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _q3k_scales(S: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit (offset) scales -> 12 bytes: low nibbles in bytes 0-7, top 2 bits in bytes 8-11."""
    lo, hi = S & 15, S >> 4
    out = np.empty((S.shape[0], 12), np.uint8)
    out[:, :8] = lo[:, :8] | (lo[:, 8:] << 4)
    out[:, 8:] = _or_shifted(hi.reshape(-1, 4, 4), axis=1, step=2)
    return out


def _check_codes(q: np.ndarray, qmax: int, t: str) -> None:
    if q.size and int(q.max()) > qmax:
        raise ValueError(f"{t} codes exceed {qmax}: max {int(q.max())}")


def pack(ggml_type: str, codes, params: dict) -> np.ndarray:
    """Block bytes of one tensor, [rows, row_bytes] uint8, in ggml's layout for `ggml_type`."""
    t = ggml_type.upper()
    block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
    q = _np(codes).astype(np.uint8)
    R, C = q.shape
    if C % block:
        raise ValueError(f"{t} needs the in-dim to be a multiple of {block}, got {C}")
    n = R * C // block
    q = q.reshape(n, block)
    p = {k: _np(v) for k, v in params.items()}
    if t in ("Q4_0", "Q4_1"):
        _check_codes(q, 15, t)
        head = [_half(p["d"], n)] + ([_half(p["m"], n)] if t == "Q4_1" else [])
        parts = head + [_nibbles32(q)]
    elif t in ("Q5_0", "Q5_1"):
        _check_codes(q, 31, t)
        head = [_half(p["d"], n)] + ([_half(p["m"], n)] if t == "Q5_1" else [])
        parts = head + [_bit4_u32(q), _nibbles32(q & 15)]
    elif t == "Q8_0":
        parts = [_half(p["d"], n), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif t == "Q2_K":
        _check_codes(q, 3, t)
        sc = _small(p["sc"], n, 16, 0, 15, "Q2_K scale")
        m = _small(p["m"], n, 16, 0, 15, "Q2_K min")
        parts = [(sc | (m << 4)).astype(np.uint8), _crumbs256(q), _half(p["d"], n), _half(p["dmin"], n)]
    elif t == "Q3_K":
        _check_codes(q, 7, t)
        S = (_small(p["sc"], n, 16, -32, 31, "Q3_K scale") + 32).astype(np.uint8)
        hmask = _or_shifted(q.reshape(n, 8, 32) >> 2, axis=1, step=1)
        parts = [hmask, _crumbs256(q & 3), _q3k_scales(S), _half(p["d"], n)]
    elif t in ("Q4_K", "Q5_K"):
        _check_codes(q, 15 if t == "Q4_K" else 31, t)
        sc = _small(p["sc"], n, 8, 0, 63, f"{t} scale").astype(np.uint8)
        m = _small(p["m"], n, 8, 0, 63, f"{t} min").astype(np.uint8)
        lo = q & 15
        qs = (lo.reshape(n, 4, 2, 32)[:, :, 0] | (lo.reshape(n, 4, 2, 32)[:, :, 1] << 4)).reshape(n, 128)
        parts = [_half(p["d"], n), _half(p["dmin"], n), _k4_scales(sc, m)]
        if t == "Q5_K":
            parts.append(_or_shifted(q.reshape(n, 8, 32) >> 4, axis=1, step=1))
        parts.append(qs.astype(np.uint8))
    elif t == "Q6_K":
        _check_codes(q, 63, t)
        sc = _small(p["sc"], n, 16, -128, 127, "Q6_K scale").astype(np.int8).view(np.uint8)
        lo = (q & 15).reshape(n, 2, 2, 64)  # [half, nibble, 64]
        ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        qh = _or_shifted((q >> 4).reshape(n, 2, 4, 32), axis=2, step=2).reshape(n, 64)
        parts = [ql.astype(np.uint8), qh, sc, _half(p["d"], n)]
    else:
        raise ValueError(f"no block packer for GGUF type {t}")
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == tsize, (t, out.shape, tsize)
    return out.reshape(R, C // block * tsize)

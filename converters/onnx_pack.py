"""Pack an IR linear (IntGrid: w = s·(q − z), fp16-valued s, integer z) into ONNX weight initializers.

Two forms (formats.md §3):

- QDQ (§3.1, §3.2): `DequantizeLinear(x, x_scale[, x_zero_point]; axis=0, block_size=g)` on x = codes
  transposed to ONNX MatMul's B layout [K=in, N=out]. DQ computes `y = (x − zp)·scale`, output dtype =
  scale dtype. Symmetric grids store `q − z` as signed int4/int8 with no zero point; asymmetric grids
  store `q` as uint4/uint8 with the zero point tensor (same shape as the scale, same type as x).
  2/3-bit codes use the 4-bit container, 5..7-bit codes the 8-bit one. 4-bit tensors are packed two per
  byte in flat row-major order, first element in the low nibble, odd counts padded (§3.1, onnx int4.md).
  Per-channel grids (group -1) use per-axis DQ: 1-D scale [N] on axis 1.
- MatMulNBits (§3.3): B uint8 [N, k_blocks, block_size·bits/8], codes of output row n packed along K
  (4-bit: element 2i in the low nibble of byte i), K padded with zero codes up to k_blocks·block_size;
  scales [N, k_blocks] fp32; zero_points uint8 [N, ceil(k_blocks·bits/8)] packed like B, each row
  padded to a byte; absent zero points mean 2^(bits−1). A group of g columns maps onto g/block_size
  blocks that repeat its scale and zero point (per-channel: the whole row), so any g that is a
  multiple of 16 is exact.

Exactness: s is an fp16 value, so fp32 `(q − z)·s` has ≤ 20 significant bits and equals the IR's fp32
dequantization bit for bit. With fp16 scales the DQ output is `fp16((q − z)·s)`, one round-to-nearest-even
of that exact value (§0); the checker compares against `ir.dequant().half()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from admmq_export.errors import UserError

MNB_BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block_size: a power of two >= 16 (§3.3); largest first


def pack_nibbles(v: np.ndarray, axis_len: int | None = None) -> np.ndarray:
    """Low-nibble-first 4-bit packing of the last axis: pairs (x, y) -> (y << 4) | (x & 0xF); odd length padded."""
    v = np.asarray(v).astype(np.uint8) & 0x0F
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def container_bits(bits: int) -> int:
    """Storage bits: 2..4-bit codes in the 4-bit container, 5..8-bit codes in the 8-bit one."""
    return 4 if bits <= 4 else 8


@dataclass
class Packed:
    """Initializers {name suffix: (array, onnx elem type, dims)}: raw packed bytes with their ONNX type and
    logical dims, or (numpy array, None, None) stored with the array's own dtype and shape; node attributes."""

    tensors: dict
    attrs: dict
    k: int
    n: int


def _check_linear(name: str, ql) -> None:
    grid = ql.grid
    if getattr(grid, "kind", None) != "int":
        raise UserError(f"{name} is on grid {grid.name}; ONNX export takes the fp32-runtime integer grid (kind 'int')",
                        "re-export with --to onnx (it plans IntGrid) or use the format that grid belongs to")
    if ql.g_idx is not None and not torch.equal(ql.g_idx.int(), _default_gidx(ql)):
        raise UserError(f"{name} uses act-order (non-contiguous groups), which blocked DequantizeLinear and "
                        "MatMulNBits cannot express (MatMulNBits g_idx is deprecated, formats.md §3.3)",
                        "re-quantize without --act-order for --to onnx")


def _default_gidx(ql) -> torch.Tensor:
    cols = ql.codes.shape[1]
    return (torch.arange(cols) // ql.grid.unit(cols)).int()


def _scale_zero(ql):
    """(scale fp16 numpy [N, n_units], zero uint8 numpy [N, n_units])."""
    s = ql.params["scale"][..., 0].cpu().numpy()
    z = ql.params["zero"][..., 0].cpu().numpy().astype(np.int32)
    return s, z


def pack_qdq(name: str, ql, scale_dtype: str = "fp32") -> Packed:
    """Initializers and DQ attributes for x [K, N] (see the module docstring)."""
    from onnx import TensorProto

    _check_linear(name, ql)
    grid = ql.grid
    n, k = ql.codes.shape
    q = ql.codes.cpu().numpy().astype(np.int32).T  # [K, N]
    s, z = _scale_zero(ql)  # [N, U]
    cb = container_bits(grid.bits)
    blocked = grid.group_size != 0
    sT, zT = (s.T, z.T) if blocked else (s[:, 0], z[:, 0])  # [U, N] blocked, [N] per-axis
    if grid.sym:
        x = q - _expand_rows(zT, grid.group_size) if blocked else q - zT[None, :]
        elem = TensorProto.INT4 if cb == 4 else TensorProto.INT8
        zp = None
    else:
        x = q
        elem = TensorProto.UINT4 if cb == 4 else TensorProto.UINT8
        zp = zT
    sdt = np.float16 if scale_dtype == "fp16" else np.float32
    out = {"qweight": (_encode(x, cb), elem, (k, n)), "scales": (sT.astype(sdt), None, None)}
    if zp is not None:
        out["zero_points"] = (_encode(zp, cb), elem, zp.shape)
    attrs = {"axis": 0, "block_size": grid.group_size} if blocked else {"axis": 1}
    return Packed(out, attrs, k, n)


def _expand_rows(zT: np.ndarray, g: int) -> np.ndarray:
    return np.repeat(zT, g, axis=0)


def _encode(x: np.ndarray, cb: int) -> np.ndarray:
    """Raw bytes of an int4/uint4 (packed, flat row-major) or int8/uint8 tensor (two's complement)."""
    if cb == 4:
        return pack_nibbles(x.reshape(-1))
    return (x.astype(np.int64).reshape(-1) & 0xFF).astype(np.uint8)


def mnb_block_size(group_size: int, k: int) -> int | None:
    """The MatMulNBits block for a group (0 = per channel over k columns): the largest power of two in 16..256
    dividing it; per channel with no such divisor, 128 with K zero-padded to whole blocks; None if impossible."""
    g = group_size or k
    for b in MNB_BLOCKS:
        if g % b == 0:
            return b
    return 128 if group_size == 0 else None  # per channel: K padded up to whole blocks


def check_mnb_grid(group_size: int) -> None:
    """Refuse group sizes no MatMulNBits block (a power of two in 16..256) divides."""
    if group_size and mnb_block_size(group_size, group_size) is None:
        raise UserError(
            f"MatMulNBits needs blocks of 16..256 (a power of two) along K; group size {group_size} is not a multiple of 16",
            "use --group-size 16/32/64/128/256 (or -1), or --to onnx (QDQ DequantizeLinear takes any group size)")


def pack_matmulnbits(name: str, ql) -> Packed:
    """B, scales and (asym or non-default zero) zero_points of com.microsoft.MatMulNBits."""
    _check_linear(name, ql)
    grid = ql.grid
    n, k = ql.codes.shape
    check_mnb_grid(grid.group_size)
    bs = mnb_block_size(grid.group_size, k)
    cb = container_bits(grid.bits)
    kb = -(-k // bs)
    q = ql.codes.cpu().numpy().astype(np.uint8)
    qpad = np.zeros((n, kb * bs), np.uint8)
    qpad[:, :k] = q
    s, z = _scale_zero(ql)  # [N, U]
    per_block = (grid.group_size or kb * bs) // bs
    sb = np.repeat(s.astype(np.float32), per_block, axis=1)[:, :kb]
    zb = np.repeat(z, per_block, axis=1)[:, :kb]
    blob = qpad.reshape(n, kb, bs)
    B = pack_nibbles(blob) if cb == 4 else blob
    out = {"B": (np.ascontiguousarray(B), None, None), "scales": (sb, None, None)}
    if not (zb == 2 ** (cb - 1)).all():
        zp = pack_nibbles(zb) if cb == 4 else zb.astype(np.uint8)
        out["zero_points"] = (np.ascontiguousarray(zp), None, None)
    attrs = {"K": k, "N": n, "bits": cb, "block_size": bs, "accuracy_level": 1}  # 1: fp32 compute, exact (§3.3)
    return Packed(out, attrs, k, n)

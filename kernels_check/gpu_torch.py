"""torch's own int4/int8 weight-only GEMMs, probed with the identity (gpu_kernels.md §1, §5.1 check A).

- tinygemm `aten._weight_int4pack_mm` (CUDA, `int4mm.cu`): uint4 codes, `qScaleAndZeros` [K/g, N, 2] bf16,
  w = bf16(fma(q − 8, s, zf)); groups 32/64/128/256; bf16 only (fp16 fails `Expected A.dtype() == kBFloat16`).
  Bit-exact for sym with zf = 0 [M]. An integer zero z ≠ 8 would need zf = bf16((8 − z)·s): two roundings
  where `(q − z)·s` has one, 16 % of elements differ [M], so asymmetric grids are not representable.
  No g_idx: an act-order tensor is probed with its columns sorted by group, then put back.
- `aten._weight_int4pack_mm_for_cpu` / `_convert_weight_to_int4pack_for_cpu` (ATen `int4mm_kernel.cpp`):
  the same layout on CPU; bf16 and fp16 activations/scales (fp16 reproduces the GPTQ fp16 weight itself).
- `aten._weight_int8pack_mm`: int8 q − 128 [N, K], one scale per row, w = dt(q·s) [M]; CUDA bf16, CPU bf16.
  (torch 2.13's CPU fp16 path returns values off by ~1.75x on an identity probe, so it is not in the table.)
"""
from __future__ import annotations

import torch

from .gpu import KERNELS, IntTensor, Kernel, cuda_ready

TINYGEMM_GROUPS = (32, 64, 128, 256)


def _fits_int4(t: IntTensor, cuda: bool) -> str:
    """CUDA packs N in tiles of 8 rows; the CPU packer checks `expect N to be dividable by 16`."""
    N, K = t.shape
    g = t.group_size or K
    if t.bits != 4:
        return f"tinygemm holds 4-bit codes, not {t.bits}-bit"
    if not t.sym:
        return ("asymmetric integer zero points: tinygemm adds a float zero after scaling, bf16(fma(q-8, s, zf)), "
                "two roundings where (q-z)*s has one")
    if g not in TINYGEMM_GROUPS:
        return f"group {'per-channel (K=' + str(K) + ')' if not t.group_size else g} not in tinygemm's {TINYGEMM_GROUPS}"
    tile = 8 if cuda else 16
    if N % tile:
        return f"out-dim {N} not a multiple of {tile} ({'tinygemm' if cuda else 'the CPU int4 packer'}'s row tile)"
    if t.act_order and bool((torch.bincount(t.g_idx.long()) != g).any()):
        return "act-order groups of unequal size cannot be sorted into tinygemm's contiguous groups"
    return ""


def _run_int4(t: IntTensor, device: str, dt: torch.dtype) -> torch.Tensor:
    q = t.codes.int()
    N, K = q.shape
    perm = torch.argsort(t.g_idx.long(), stable=True) if t.act_order else None
    if perm is not None:
        q = q[:, perm]
    s = t.scales.to(dt)
    sz = torch.stack([s, torch.zeros_like(s)], -1).transpose(0, 1).contiguous().to(device)  # [G, N, 2]
    eye = torch.eye(K, dtype=dt, device=device)
    g = t.group_size or K
    if device == "cpu":
        B = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        W = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, B, g, sz).t()
    else:
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device)  # even k in the high nibble
        B = torch.ops.aten._convert_weight_to_int4pack(packed, 2)
        W = torch.ops.aten._weight_int4pack_mm(eye, B, g, sz).t()
    if perm is not None:
        out = torch.empty_like(W)
        out[:, perm.to(W.device)] = W
        W = out
    return W


def _fits_int8(t: IntTensor, cpu: bool = False) -> str:
    """torch 2.13's CPU kernel reads K in vectors of 8 and segfaults otherwise (measured: K=172 crashes, 168 runs)."""
    if t.bits != 8:
        return f"int8pack holds 8-bit codes, not {t.bits}-bit"
    if not t.sym:
        return "asymmetric zero points: int8pack has none (w = q*s)"
    if t.scales.shape[1] != 1:
        return f"int8pack has one scale per row; this grid has {t.scales.shape[1]} groups per row"
    if cpu and t.shape[1] % 8:
        return f"in-dim {t.shape[1]} not a multiple of 8 (the CPU int8pack kernel crashes on it)"
    return ""


def _run_int8(t: IntTensor, device: str, dt: torch.dtype) -> torch.Tensor:
    w = (t.codes.short() - 128).to(torch.int8).to(device)
    s = t.scales[:, 0].to(dt).to(device)
    return torch.ops.aten._weight_int8pack_mm(torch.eye(t.shape[1], dtype=dt, device=device), w, s).t()


def _has(op: str) -> str:
    return "" if hasattr(torch.ops.aten, op) else f"torch {torch.__version__} has no aten.{op}"


BF16, F16 = torch.bfloat16, torch.float16
_GEMM = lambda t: True  # noqa: E731 - every torch kernel here is read through the identity GEMM
KERNELS += [
    Kernel("torch _weight_int4pack_mm cuda bf16", IntTensor, "cuda", lambda t: _fits_int4(t, True), cuda_ready,
           lambda t, d: _run_int4(t, d, BF16), BF16, BF16, gemm_probe=_GEMM),
    Kernel("torch _weight_int8pack_mm cuda bf16", IntTensor, "cuda", _fits_int8, cuda_ready,
           lambda t, d: _run_int8(t, d, BF16), BF16, BF16, gemm_probe=_GEMM),
    Kernel("torch _weight_int4pack_mm_for_cpu CPU-kernel bf16", IntTensor, "cpu", lambda t: _fits_int4(t, False),
           lambda: _has("_weight_int4pack_mm_for_cpu"), lambda t, d: _run_int4(t, "cpu", BF16), BF16, BF16, gemm_probe=_GEMM),
    Kernel("torch _weight_int4pack_mm_for_cpu CPU-kernel fp16", IntTensor, "cpu", lambda t: _fits_int4(t, False),
           lambda: _has("_weight_int4pack_mm_for_cpu"), lambda t, d: _run_int4(t, "cpu", F16), F16, F16, gemm_probe=_GEMM),
    Kernel("torch _weight_int8pack_mm CPU-kernel bf16", IntTensor, "cpu", lambda t: _fits_int8(t, cpu=True),
           lambda: _has("_weight_int8pack_mm"), lambda t, d: _run_int8(t, "cpu", BF16), BF16, BF16, gemm_probe=_GEMM),
]

"""Local search on the grid: exact cyclic coordinate descent against the true layer objective (admmq.md §4).

f(W) = ½·Tr((W − Ŵ) H (W − Ŵ)ᵀ), group parameters fixed, so every entry W_ij lives on the arithmetic grid
a_ij·c + b_ij, c ∈ 0..qmax. Keeping the gradient R = (W − Ŵ)·H, the exact 1-D minimiser of entry (i, j) is the grid
point nearest to w* = W_ij − R_ij/H_jj, i.e. code c* = c_ij − R_ij/(a_ij·H_jj). A move is applied only where its exact
change Δf = δ·(R_ij + ½·H_jj·δ) is negative, so the objective never increases (also under floating-point noise).

Rows of W are independent (H couples the columns of one row only), so the cyclic sweep over columns runs for all
rows at once, each row at its own position. Columns are visited in blocks, and inside a block the moves are found in
rounds instead of one column at a time: every still-active row proposes the 1-D minimiser of all its block columns
at or after its position, given its current R; the first improving column of each row is exactly the move the
column-by-column sweep would make next in that row (nothing before it moves), so it is applied, that row's gradient
is updated (R_i += δ·H_j, one rank-1 column update per move: moves are sparse), and the row resumes after it. A row
with no improving column left is done with the block. The moves, their order per row and so the result are those of
the sequential sweep, in a few tensor operations per round instead of per column.
"""
from __future__ import annotations

import torch

from . import reciprocal_or_zero


def local_search(codes: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                 qmax: int, sweeps: int = 3, tol: float = 1e-6, block: int = 128) -> tuple[torch.Tensor, dict]:
    """Polish integer codes [m, n] with per-entry grid (A, B) [m, n]. Returns (codes, stats)."""
    q = codes.float().clone()
    W = A * q + B
    E = W - W_hat
    R = E @ H
    f0 = f_old = 0.5 * float((E * R).double().sum())
    m, n = W.shape
    hdiag = torch.diagonal(H)
    step = reciprocal_or_zero(A) / hdiag[None, :]  # code change per unit of gradient (A = 0: no move)
    moved = 0
    done_sweeps = 0
    for _ in range(sweeps):
        done_sweeps += 1
        for i1 in range(0, n, block):
            moved += _block(R, q, W, A, B, step, H, i1, min(i1 + block, n), qmax)
        f_new = 0.5 * float(((W - W_hat) * R).double().sum())
        if f_old - f_new <= tol * abs(f_old):
            f_old = f_new
            break
        f_old = f_new
    return q.to(torch.uint8), {"ls_f_before": f0, "ls_f_after": f_old, "ls_moves": moved, "ls_sweeps": done_sweeps}


def _block(R, q, W, A, B, step, H, i1, i2, qmax) -> int:
    """One cyclic pass over columns i1..i2 of every row, in rounds (module docstring); updates R, q, W in place.

    Moves are sparse (about 1% of the entries per sweep after ADMM), so each accepted move updates its row's gradient
    directly, R_i += δ·H_j (a contiguous row), instead of one dense GEMM per block."""
    blk = slice(i1, i2)
    Rb, qb, Wb, Ab, Bb, Sb = R[:, blk], q[:, blk], W[:, blk], A[:, blk], B[:, blk], step[:, blk]
    half = (0.5 * torch.diagonal(H)[blk])[None, :]
    pos = torch.arange(i2 - i1, device=R.device)[None, :]
    rank = (i2 - i1) - pos  # larger for earlier columns
    rows = torch.arange(R.shape[0], device=R.device)
    start = torch.zeros_like(rows)
    moved = 0
    first = True
    while rows.numel():
        if first:  # every row, every column: no gathers needed
            r, qa, a, b, s, w = Rb, qb, Ab, Bb, Sb, Wb
        else:
            r, qa, a, b, s, w = (t.index_select(0, rows) for t in (Rb, qb, Ab, Bb, Sb, Wb))
        c = torch.addcmul(qa, r, s, value=-1.0).round_().clamp_(0, qmax)
        d = torch.addcmul(b, a, c).sub_(w)
        gain = (d * torch.addcmul(r, half, d)) < 0  # exact Δf = δ·(R + ½·H_jj·δ)
        if not first:
            gain &= pos >= start[:, None]
        first = False
        sel = gain.any(1).nonzero().squeeze(1)
        if not sel.numel():
            break
        k = (gain.index_select(0, sel) * rank).argmax(1)  # first improving column of each row (distinct ranks)
        dk, ck, rsel = d[sel, k], c[sel, k], rows[sel]
        col = k + i1
        q[rsel, col] = ck
        W[rsel, col] = torch.addcmul(B[rsel, col], A[rsel, col], ck)
        R.index_add_(0, rsel, H.index_select(0, col) * dk[:, None])  # rsel are distinct rows: one move each per round
        moved += int(sel.numel())
        rows, start = rsel, k + 1
    return moved

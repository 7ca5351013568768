"""Local search on the grid: exact cyclic coordinate descent against the true layer objective (admmq.md §4).

f(W) = ½·Tr((W − Ŵ) H (W − Ŵ)ᵀ), group parameters fixed, so every entry W_ij lives on the arithmetic grid
a_ij·c + b_ij, c ∈ 0..qmax. Keeping the gradient R = (W − Ŵ)·H, the exact 1-D minimiser of column j (all rows at
once, rows are independent) is the grid point nearest to w* = W[:, j] − R[:, j]/H_jj. A move is applied only where
its exact change Δf_i = ½·H_jj·δ_i² + δ_i·R_ij is negative, so the objective never increases (also under
floating-point noise). GEMM-bound form (QuantEase, GPTQ's lazy batch): columns are visited in blocks; inside a
block only R[:, block] is kept current, then one GEMM R += Δ_block·H[block, :] brings every column up to date.
"""
from __future__ import annotations

import torch


def local_search(codes: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                 qmax: int, sweeps: int = 3, tol: float = 1e-6, block: int = 32) -> tuple[torch.Tensor, dict]:
    """Polish integer codes [m, n] with per-entry grid (A, B) [m, n]. Returns (codes, stats).

    Works on transposed copies so that a column is one contiguous row; R is kept as Rᵀ = H·Eᵀ."""
    q = codes.float().T.contiguous()
    At, Bt = A.T.contiguous(), B.T.contiguous()
    W = At * q + Bt
    E = W - W_hat.T
    R = H @ E
    f0 = f_old = 0.5 * float((E * R).double().sum())
    n = W.shape[0]
    hdiag = torch.diagonal(H).tolist()
    invA = torch.where(At == 0, torch.zeros_like(At), 1.0 / torch.where(At == 0, torch.ones_like(At), At))  # A = 0: no move
    moved = 0
    done_sweeps = 0
    for _ in range(sweeps):
        done_sweeps += 1
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            Rb = R[i1:i2].clone()
            Hb = H[i1:i2, i1:i2]
            delta = torch.zeros_like(Rb)
            for k in range(i2 - i1):
                j = i1 + k
                wj, rk, h = W[j], Rb[k], hdiag[j]
                c = torch.add(wj, rk, alpha=-1.0 / h).sub_(Bt[j]).mul_(invA[j]).round_().clamp_(0, qmax)
                w_new = torch.addcmul(Bt[j], At[j], c)
                d = w_new - wj
                ok = (d * (0.5 * h * d + rk)) < 0  # exact Δf_i = ½·H_jj·δ² + δ·R_ij
                if not bool(ok.any()):
                    continue
                d = torch.where(ok, d, torch.zeros_like(d))
                q[j] = torch.where(ok, c, q[j])
                W[j] = torch.where(ok, w_new, wj)
                moved += int(ok.sum())
                Rb.addr_(Hb[:, k], d)
                delta[k] = d
            if bool(delta.any()):
                R.addmm_(H[:, i1:i2], delta)
        f_new = 0.5 * float(((W - W_hat.T) * R).double().sum())
        if f_old - f_new <= tol * abs(f_old):
            f_old = f_new
            break
        f_old = f_new
    return q.T.contiguous().to(torch.uint8), {"ls_f_before": f0, "ls_f_after": f_old, "ls_moves": moved,
                                              "ls_sweeps": done_sweeps}

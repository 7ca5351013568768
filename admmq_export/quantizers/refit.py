"""Grid refresh (admmq.md §6, A5; off by default): codes fixed, refit each row's group scales and offsets by
H-weighted least squares — the exact minimiser of f given the codes — then store them in the grid's own format.

Row i with per-group (a_k, b_k): w_i = J_i·θ_i, J_i = [codes of group k | ones of group k]_k, and
(J_iᵀ H J_i)·θ_i = J_iᵀ H ŵ_i. Symmetric grids keep z = 2^(b−1), so b_k = −a_k·z and θ = (a_k) only.
Storage: scale → fp16, zero → round(−b/a) clamped to the code range; codes are then re-projected on the stored
grid. Applies to grids whose parameters are a fp16 `scale` and an integer `zero` per group (int, GPTQ, Marlin);
the caller keeps the refit only when it lowers the objective.
"""
from __future__ import annotations

import torch


def can_refit(grid, params: dict) -> bool:
    return set(params) == {"scale", "zero"} and grid.sub_size in (0, grid.group_size)


def refit(grid, codes: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> dict:
    """New {scale, zero} [m, G, 1] for fixed codes [m, n]."""
    m, n = codes.shape
    g = grid.unit(n)
    G = n // g
    q = codes.double().reshape(m, G, g)
    eye = torch.eye(G, dtype=torch.float64, device=codes.device)
    if grid.sym:
        z = (grid.qmax + 1) // 2
        J = ((q - z).unsqueeze(-1) * eye[None, :, None, :]).reshape(m, n, G)  # a_k·(q − z)
    else:
        Jc = (q.unsqueeze(-1) * eye[None, :, None, :]).reshape(m, n, G)
        Jo = eye[:, None, :].expand(G, g, G).reshape(1, n, G).expand(m, n, G)
        J = torch.cat([Jc, Jo], dim=-1)
    Hd = H.double()
    HJ = torch.einsum("ij,mjk->mik", Hd, J)
    A = torch.einsum("mik,mil->mkl", J, HJ)
    rhs = torch.einsum("mik,mi->mk", HJ, W_hat.double())
    A = A + 1e-10 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    theta = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    a = theta[:, :G].clamp_min(1e-8)
    scale = a.to(torch.float16)
    scale = torch.where(scale == 0, torch.full_like(scale, 2**-24), scale)
    if grid.sym:
        zero = torch.full_like(a, (grid.qmax + 1) // 2)
    else:
        b = theta[:, G:]
        zero = torch.round(-b / scale.double()).clamp(0, grid.qmax)
    return {"scale": scale.unsqueeze(-1), "zero": zero.to(torch.uint8).unsqueeze(-1)}

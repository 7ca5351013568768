"""Grid refresh (admmq.md §6, A5; off by default): codes fixed, refit each row's group scales and offsets by
H-weighted least squares — the exact minimiser of f given the codes — then store them in the grid's own format.

Row i with per-group (a_k, b_k): w_i = J_i·θ_i, J_i = [codes of group k | ones of group k]_k, and
(J_iᵀ H J_i)·θ_i = J_iᵀ H ŵ_i. Grids of the "scale" form keep their code offset z (symmetric int, Q4_0/Q5_0/Q8_0),
so b_k = −a_k·z and θ = (a_k) only. The grid stores the result (`Grid.store_affine`: fp16 scale and integer zero
for int/GPTQ/Marlin, fp16 d and m for Q4_1/Q5_1, fp16 d for Q*_0); codes are then re-projected on the stored grid.
Grids with sub-scales under a super-block scale (K-quants) are not refitted. The caller keeps the refit only when
it lowers the objective.
"""
from __future__ import annotations

import torch


def can_refit(grid, params: dict) -> bool:
    return grid.refit_form() is not None and grid.sub_size in (0, grid.group_size)


def refit(grid, codes: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> dict:
    """New parameters (the grid's own storage, [m, G, 1] each) for fixed codes [m, n]."""
    m, n = codes.shape
    g = grid.unit(n)
    G = n // g
    q = codes.double().reshape(m, G, g)
    eye = torch.eye(G, dtype=torch.float64, device=codes.device)
    scale_only = grid.refit_form() == "scale"
    if scale_only:
        J = ((q - grid.code_offset).unsqueeze(-1) * eye[None, :, None, :]).reshape(m, n, G)  # a_k·(q − z)
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
    a = theta[:, :G]
    b = -grid.code_offset * a if scale_only else theta[:, G:]
    return grid.store_affine(a, b)

"""Grid refresh (admmq.md §6, A5; off by default): codes fixed, refit each row's scales and offsets by H-weighted
least squares — the exact minimiser of f given the codes — then store them in the grid's own format.

The refit works per *sub-unit* (the columns that share one affine map: a group, or a K-quant sub-block).
Row i with per-sub-unit (a_k, b_k): w_i = J_i·θ_i, J_i = [codes of sub-unit k | ones of sub-unit k]_k, and
(J_iᵀ H J_i)·θ_i = J_iᵀ H ŵ_i. Grids of the "scale" form keep their code offset z (symmetric int, Q4_0/Q5_0/Q8_0,
Q3_K/Q6_K), so b_k = −a_k·z and θ = (a_k) only. JᵀHJ is formed blockwise from H (never J itself), rows in chunks.
The grid stores the result (`Grid.store_affine`): fp16 scale and integer zero for int/GPTQ/Marlin, fp16 d (and m)
for Q*_0/Q*_1, and for the K-quants a new fp16 super-scale (d, dmin) with the integer sub-scales (and mins)
rounded under it; those integers are then improved by exact coordinate descent on each row's quadratic
(θ − θ*)ᵀ(JᵀHJ)(θ − θ*) (θ* the least-squares optimum), and with them fixed a second least squares refits the
super-scales: per 256-block w = d·(sc_j·q) − dmin·m_j is linear in (d, dmin), rounded to fp16 once.
The caller polishes the codes (the ones the refit was fitted for) on the stored grid and keeps the refit only when
it lowers the objective.
"""
from __future__ import annotations

import torch

ROW_CHUNK_BYTES = 64 << 20  # the blockwise H·C product of one chunk of rows, in fp64
SYSTEM_CHUNK_BYTES = 256 << 20  # the per-row normal equations of one chunk of rows, in fp64


def can_refit(grid, params: dict) -> bool:
    return grid.refit_form() is not None


def refit(grid, codes: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, current: dict | None = None) -> dict:
    """New parameters (the grid's own storage) for fixed codes [m, n]; `current` (the parameters the codes were
    found on) is a second starting point for the K-quants' integer search. Rows are independent: done in chunks
    whose normal equations (k² fp64 per row, k = 2·n/sub) stay under SYSTEM_CHUNK_BYTES."""
    m, n = codes.shape
    k = 2 * (n // grid.sub(n))
    step = max(1, SYSTEM_CHUNK_BYTES // (8 * k * k))
    Hd = H.double()
    parts = [_refit_rows(grid, codes[r:r + step], W_hat[r:r + step], Hd,
                         None if current is None else {key: v[r:r + step] for key, v in current.items()})
             for r in range(0, m, step)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _refit_rows(grid, codes, W_hat, Hd, current):
    n = codes.shape[1]
    HW = W_hat.double() @ Hd  # rows of Ŵ·H (H symmetric)
    scale_only = grid.refit_form() == "scale"
    q = codes.double() - (grid.code_offset if scale_only else 0)
    bases = [q] if scale_only else [q, torch.ones_like(q)]
    A, rhs = _normal_equations(bases, Hd, HW, grid.sub(n))
    theta = _solve(A, rhs)
    G = theta.shape[1] // len(bases)
    a, b = theta[:, :G], (-grid.code_offset * theta[:, :G] if scale_only else theta[:, G:])
    params = grid.store_affine(a, b)
    if "sc" not in params:
        return params
    keys = ["sc"] if scale_only else ["sc", "m"]
    best = None
    for start in [params] + ([current] if current is not None else []):
        u, cost = _k_integers(grid, start, keys, A, theta, n)
        if best is None:
            best = (u, cost)
        else:
            take = cost < best[1]
            best = (torch.where(take[:, None], u, best[0]), torch.where(take, cost, best[1]))
    u = best[0]
    # the super-scales refitted for those integers: per 256-block w = d·(sc_j·q) − dmin·m_j
    sub, unit = grid.sub(n), grid.unit(n)
    ints = {k: u[:, i * G:(i + 1) * G] for i, k in enumerate(keys)}
    cols = [ints["sc"].repeat_interleave(sub, 1) * q] + ([] if scale_only else [-ints["m"].repeat_interleave(sub, 1)])
    th = _solve(*_normal_equations(cols, Hd, HW, unit))
    U, shape = n // unit, params["sc"].shape
    out = {"d": th[:, :U].to(torch.float16).unsqueeze(-1), "sc": ints["sc"].reshape(shape).to(params["sc"].dtype)}
    if not scale_only:
        out.update(dmin=th[:, U:].to(torch.float16).unsqueeze(-1), m=ints["m"].reshape(shape).to(params["m"].dtype))
    return out


def _k_integers(grid, params: dict, keys: list[str], A: torch.Tensor, theta: torch.Tensor, n: int):
    """The integer sub-scales (and mins) under `params`' super-scales by exact coordinate descent on each row's
    quadratic (θ − θ*)ᵀA(θ − θ*), θ = d·sc (and −dmin·m): (integers [m, k], cost [m])."""
    m = theta.shape[0]
    per = grid.unit(n) // grid.sub(n)
    u = torch.cat([params[k].double().reshape(m, -1) for k in keys], 1)
    D = torch.cat([sg * params[k].double().reshape(m, -1).repeat_interleave(per, 1)
                   for sg, k in zip((1.0, -1.0), ("d", "dmin")[: len(keys)])], 1)
    k = u.shape[1]
    lo = torch.full((k,), float(getattr(grid, "sc_lo", 0)), dtype=torch.float64)
    hi = torch.full((k,), float(getattr(grid, "sc_hi", getattr(grid, "sc_max", 0))), dtype=torch.float64)
    g = torch.einsum("mkl,ml->mk", A, D * u - theta)  # ½ gradient of the quadratic in θ
    Adiag = A.diagonal(dim1=-2, dim2=-1)
    for _ in range(SUBSCALE_SWEEPS):
        moved = False
        for j in range(k):
            dj = D[:, j]
            best = torch.zeros(m, dtype=torch.float64)
            step = torch.zeros(m, dtype=torch.float64)
            for s in (1.0, -1.0):
                gain = -(2 * s * dj * g[:, j] + dj * dj * Adiag[:, j])  # decrease of the quadratic for u_j += s
                ok = (u[:, j] + s >= lo[j]) & (u[:, j] + s <= hi[j]) & (gain > best)
                best, step = torch.where(ok, gain, best), torch.where(ok, torch.full_like(step, s), step)
            if bool((step != 0).any()):
                moved = True
                u[:, j] += step
                g += (step * dj)[:, None] * A[:, :, j]
        if not moved:
            break
    e = D * u - theta
    return u, torch.einsum("mk,mkl,ml->m", e, A, e)


SUBSCALE_SWEEPS = 4


def _normal_equations(bases: list[torch.Tensor], Hd: torch.Tensor, HW: torch.Tensor, s: int):
    """(JᵀHJ, JᵀHŵ) per row for Ŵθ = Σ_b θ_{b,k}·basis_b on each run k of s columns; bases [m, n] each."""
    m, n = bases[0].shape
    G = n // s
    Hb = Hd.reshape(G, s, G, s)
    k = len(bases) * G
    A = torch.empty(m, k, k, dtype=torch.float64, device=Hd.device)
    rhs = torch.empty(m, k, dtype=torch.float64, device=Hd.device)
    step = max(1, ROW_CHUNK_BYTES // (8 * n * G))
    for r0 in range(0, m, step):
        Bs = [B[r0:r0 + step].reshape(-1, G, s) for B in bases]
        HB = [torch.einsum("kilj,rlj->rkil", Hb, B) for B in Bs]  # H·(basis on sub-unit l), rows of sub-unit k
        hw = HW[r0:r0 + step].reshape(-1, G, s)
        for i, Bi in enumerate(Bs):
            rhs[r0:r0 + step, i * G:(i + 1) * G] = (Bi * hw).sum(-1)
            for j, HBj in enumerate(HB):
                A[r0:r0 + step, i * G:(i + 1) * G, j * G:(j + 1) * G] = torch.einsum("rki,rkil->rkl", Bi, HBj)
    return A, rhs


def _solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    ridge = 1e-10 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    A = A + ridge[:, None, None] * torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)

"""ADMM-Q (Lucas et al., arXiv:2605.11222) on any grid, as specified in ../shared/docs/admmq.md.

    min ½·Tr((W − Ŵ) H (W − Ŵ)ᵀ)  s.t.  W on the grid (group parameters fixed first, §6 A1)

* Preconditioning (§3): dead inputs, damping 0.01·mean(diag H), Jacobi scaling d = sqrt(diag H) so H̃ has a unit
  diagonal, cached per distinct H (q/k/v and gate/up share theirs). `precondition=False` (ablation) scales by one
  scalar instead, so ρ keeps its meaning on average.
* Splitting (§2), all rows at once in the scaled coordinates B = W·diag(d) (rows of W as rows, so no transposes):
  W-step B = (G − V + ρD)·(H̃ + ρI)⁻¹, G = B̂·H̃. `solver="cholesky"` (default; §2.1's alternative): one Cholesky
  of H̃ + ρI per distinct ρ, then either M_ρ = its inverse (one GEMM per iteration) or two triangular solves per
  iteration, whichever is cheaper for the shape and device (WStep). `solver="eigh"` (§3 step 4, the ALPS form):
  H̃ = U·diag(λ)·Uᵀ once in fp64 (kept fp32), M_ρ = U·diag(1/(λ+ρ))·Uᵀ or (R·U/(λ+ρ))·Uᵀ. Same iterates up to
  fp32 rounding; the Cholesky form skips the fp64 eigendecomposition, which dominated ADMM-Q's time on wide layers.
  ρ changes at most once per check (3 iterations), so the factor is refreshed at most that often; the factors are
  kept per Hessian (up to FACTOR_CACHE_BYTES), so layers sharing H (q/k/v, gate/up) reuse those of the ρ values
  their schedules have in common.
  D-step D = Π(B + V/ρ), the exact nearest grid point of every entry for its fixed (a, b);
  dual V += ρ(B − D).
* Penalty schedule (§2.4, ALPS): every 3 iterations, s = codes changed since the last check:
  s/k > 0.1 → ρ·1.3; > 0.005 → ρ·1.2; s ≥ 1 → ρ·1.1 once grown, else ρ/5 and restart; s = 0 → stop once grown,
  else ρ/5. Cap 1e6. Stop after t ≥ 30 iterations with s/k < 3e−4 (admmq-reference.md §4), or max_iter. `schedule="fixed"` (ablation): ρ·1.1 every
  check, the §10 prototype.
* Output (§2.6): the lower-objective of Π(B) and D; then local search (§4, exact cyclic CD, quantizers/local_search).
* Initialisation (§5): RTN on the fixed grid (default) or GPTQ with static groups (same grid). The result is never
  worse than its initialisation: the initial codes are kept when ADMM + local search does not beat them.
  `safety_net=True` also runs GPTQ (the caller's options) + local search and keeps the lower objective.
* Grid refresh (§6, `refit=True`, off by default): scales/zeros (K-quants: sub-scales/mins under a new super-scale)
  refitted by H-weighted least squares for the final codes (quantizers/refit.py), codes re-projected and polished;
  kept only when the objective drops. `refit_rounds=k` alternates: after each kept refit, ADMM runs again on the
  refitted grid from the current codes, then polish and refit once more; it stops at the first round that does
  not lower the objective.
"""
from __future__ import annotations

import time
import weakref

import torch

from ..errors import UserError
from . import QuantResult, nearest_codes, reciprocal_or_zero, register
from .gptq import prepare_hessian, quantize_gptq
from .local_search import local_search as polish
from .refit import can_refit
from .refit import refit as refit_params

RHO_MAX = 1e6
SOLVERS = ("cholesky", "eigh")
FACTOR_CACHE_BYTES = 256 << 20  # per Hessian: factors of H̃ + ρI kept for the layers that share it (q/k/v, gate/up)
_FACTORS: dict[tuple, tuple] = {}  # id(H), damp, precondition, device -> (weakref(H), d, Ht, cache of factors)


def _factor(H: torch.Tensor, Hd: torch.Tensor, damp: float, precondition: bool):
    """Scaling d and H̃, computed once per distinct Hessian object (plus a slot for its eigendecomposition)."""
    key = (id(H), damp, precondition, str(Hd.device))
    hit = _FACTORS.get(key)
    if hit is not None and hit[0]() is H:
        return hit[1:]
    diag = torch.diagonal(Hd)
    d = diag.sqrt() + 1e-8 if precondition else torch.full_like(diag, float(diag.mean().sqrt()))
    Ht = Hd / d[:, None] / d[None, :]
    out = (d, Ht, {})
    for k in [k for k, v in _FACTORS.items() if v[0]() is None]:
        del _FACTORS[k]
    _FACTORS[key] = (weakref.ref(H), *out)
    return out


def _copy(cache: dict) -> dict:
    return {k: (*v[:3], dict(v[3])) for k, v in cache.items()}


def factor_cache_snapshot() -> dict:
    """A copy of the factor cache, so a benchmark can time a rerun of a layer as if it were the first run."""
    return _copy(_FACTORS)


def factor_cache_restore(snapshot: dict) -> None:
    _FACTORS.clear()
    _FACTORS.update(_copy(snapshot))


class WStep:
    """B = R·(H̃ + ρI)⁻¹ for the current ρ, R and B [m, n] (rows of W; H̃ is symmetric). The ρ-dependent factor is
    rebuilt only when ρ changes."""

    def __init__(self, Ht: torch.Tensor, m: int, solver: str = "cholesky", cache: dict | None = None):
        if solver not in SOLVERS:
            raise UserError(f"unknown ADMM-Q W-step solver {solver!r}", f"use one of {', '.join(SOLVERS)}")
        self.Ht, self.solver, self.rho = Ht, solver, None
        n = Ht.shape[0]
        # Dense M_ρ (an inverse per ρ, then one GEMM per iteration) or a factored solve (a Cholesky per ρ, then two
        # triangular solves on the row-major R, nearly GEMM speed on CPU BLAS): whichever costs less per check of
        # 3 iterations. Measured on 2 EPYC cores, the inverse pays off only for m >= n; on CUDA triangular solves
        # are slow next to GEMMs, so the dense form wins from m > n/3.
        self.dense = 3 * m > n if Ht.is_cuda else m >= n
        self.cache = cache = {} if cache is None else cache
        if solver == "eigh":
            if "eigh" not in cache:
                lam, U = torch.linalg.eigh(Ht.double())
                cache["eigh"] = (lam.float(), U.float())
            self.lam, self.U = cache["eigh"]

    def _refresh(self, rho: float) -> None:
        self.rho = rho
        if self.solver == "eigh":
            self.M = (self.U / (self.lam + rho)) @ self.U.T if self.dense else None
            return
        key = ("cholesky", rho, self.dense)
        hit = self.cache.get(key)
        if hit is None:
            A = self.Ht.clone()
            A.diagonal().add_(rho)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info):  # not positive definite in fp32 (tiny ρ, near-singular H̃): factor in fp64
                L = torch.linalg.cholesky(A.double()).float()
            hit = (L, torch.cholesky_inverse(L) if self.dense else None)
            size = sum(t.numel() * t.element_size() for t in hit if t is not None)
            if self.cache.get("bytes", 0) + size <= FACTOR_CACHE_BYTES:
                self.cache[key] = hit
                self.cache["bytes"] = self.cache.get("bytes", 0) + size
        self.L, self.M = hit

    def __call__(self, R: torch.Tensor, rho: float) -> torch.Tensor:
        if rho != self.rho:
            self._refresh(rho)
        if self.M is not None:
            return R @ self.M
        if self.solver == "eigh":
            return ((R @ self.U).div_(self.lam + rho)) @ self.U.T
        Y = torch.linalg.solve_triangular(self.L.T, R, upper=True, left=False)  # Y·Lᵀ = R
        return torch.linalg.solve_triangular(self.L, Y, upper=False, left=False)  # B·L = Y


def _objective(A, O, c, W_hat, Hd) -> float:
    """½·Tr(E Hd Eᵀ) of codes c [m, n] on the per-entry grid (A, O)."""
    E = A * c.float() + O - W_hat
    return 0.5 * float(((E @ Hd) * E).double().sum())


def admm(Bhat, Ht, wstep, As, Os, qmax, D0, rho0=0.1, max_iter=300, check=3, t_min=30, schedule="alps",
         trace=False):
    """The ADMM iterations of §2 in scaled coordinates, rows of W as rows: Bhat, As, Os, D0 [m, n]; `wstep` solves
    B·(H̃ + ρI) = R. Returns (codes [m, n], stats)."""
    proj = lambda Y: As * nearest_codes(Y, As, Os, qmax) + Os  # noqa: E731
    inv = reciprocal_or_zero(As)
    neg_off = -(Os * inv)  # code of Y is round(Y·inv − Os·inv)
    G = Bhat @ Ht
    D, U = D0.clone(), torch.zeros_like(Bhat)  # U = V/ρ, the scaled dual (same iterates, fewer passes)
    B = Bhat
    rho, grown = rho0, False
    c_prev = nearest_codes(D, As, Os, qmax)
    fs = lambda Z: 0.5 * float(((Z - Bhat) * ((Z - Bhat) @ Ht)).double().sum())  # noqa: E731
    tr = []
    t = 0
    for t in range(max_iter):
        B = wstep(torch.add(G, torch.sub(D, U), alpha=rho), rho)  # §2.1: R = G − V + ρD
        T = B.add_(U)  # B + V/ρ (B is not needed again: B = T − U)
        c = torch.addcmul(neg_off, T, inv).round_().clamp_(0, qmax)  # §2.2: nearest grid point
        D = torch.addcmul(Os, As, c)
        U_old, U = U, torch.sub(T, D)  # §2.3: V + ρ(B − D) = ρ(T − D)
        if (t + 1) % check:
            continue
        s = int((c != c_prev).sum())
        frac = s / c.numel()
        c_prev = c
        if trace:
            tr.append({"iter": t + 1, "rho": rho, "changed": frac, "objective": fs(D),
                       "primal": float((T - U_old - D).norm() / Bhat.norm().clamp_min(1e-30))})
        rho_old = rho
        stop = False
        if schedule == "fixed":
            rho *= 1.1
        elif frac > 0.1:
            rho, grown = rho * 1.3, True
        elif frac > 0.005:
            rho, grown = rho * 1.2, True
        elif s > 0:
            if grown:
                rho *= 1.1
            else:
                rho /= 5
                D, U = D0.clone(), torch.zeros_like(U)
                B, U_old = Bhat, U
                c_prev = nearest_codes(D, As, Os, qmax)
        elif grown:
            stop = True
        else:
            rho /= 5
        rho = min(rho, RHO_MAX)
        if stop or (t + 1 >= t_min and frac < 3e-4):  # admmq-reference.md §4: after t + 1 iterations
            break
        if rho != rho_old:
            U.mul_(rho_old / rho)  # V is kept; U = V/ρ follows ρ
    if B is not Bhat:
        B = T.sub_(U_old)
    PB = proj(B)
    if torch.equal(PB, D):  # the usual case at convergence: nothing to choose, no objective evaluation
        f, which, Z = None, "D", D
    else:
        f, which, Z = min([(fs(PB), "proj_B", PB), (fs(D), "D", D)], key=lambda x: x[0])
    return nearest_codes(Z, As, Os, qmax), {"admm_iters": t + 1, "rho_final": rho, "final_iterate": which,
                                         "admm_f_scaled": f, "trace": tr}


@register("admmq")
def quantize_admmq(W: torch.Tensor, H: torch.Tensor, grid, damp: float = 0.01, rho0: float = 0.1, iters: int = 300,
                   check: int = 3, t_min: int = 30, schedule: str = "alps", precondition: bool = True,
                   local_search_sweeps: int = 3, local_search: bool = True, init: str = "rtn", safety_net: bool = False,
                   clip_search: bool = False, act_order: bool = False, static_groups: bool = False, trace: bool = False,
                   refit: bool = False, refit_rounds: int = 1, solver: str = "cholesky", **_) -> QuantResult:
    if H is None:
        raise UserError("ADMM-Q needs calibration activations", "run it through the calibrated pipeline")
    if act_order:
        raise UserError("ADMM-Q fixes the grid before optimising and has no column order (admmq.md §6)",
                        "drop --act-order (it applies to --method gptq)")
    if schedule not in ("alps", "fixed"):
        raise UserError(f"unknown ADMM-Q penalty schedule {schedule!r}", "use alps or fixed")
    t0 = time.time()
    m, n = W.shape
    W_hat, Hd = prepare_hessian(W, H, damp)
    d, Ht, cache = _factor(H, Hd, damp, precondition)
    wstep = WStep(Ht, m, solver, cache)
    weight = torch.diagonal(Hd).clone() if clip_search else None
    params = grid.fit(W_hat, clip_search=clip_search, weight=weight)  # A1: the grid is fixed first
    A, O = grid.column_affine(params, n)
    A, O = A.to(W_hat.device), O.to(W_hat.device)
    As, Os = A * d[None, :], O * d[None, :]

    def f_codes(c):  # the true (damped) objective of codes [m, n] on the current grid
        return _objective(A, O, c, W_hat, Hd)

    if init == "gptq":
        init_codes = quantize_gptq(W, H, grid, damp=damp, static_groups=True, clip_search=clip_search).codes.float()
    elif init == "rtn":
        init_codes = nearest_codes(W_hat, A, O, grid.qmax)
    else:
        raise UserError(f"unknown ADMM-Q initialisation {init!r}", "use rtn or gptq")
    Bhat = W_hat * d[None, :]
    D0 = As * init_codes + Os
    codes, st = admm(Bhat, Ht, wstep, As, Os, grid.qmax, D0, rho0, iters, check, t_min, schedule, trace)
    st["f_init"] = f_codes(init_codes)
    st["admm_seconds"] = time.time() - t0
    if local_search:  # it evaluates the objective before and after (same A, O, Ŵ, H), so no extra GEMMs here
        codes_u8, ls = polish(codes, A, O, W_hat, Hd, grid.qmax, sweeps=local_search_sweeps)
        codes = codes_u8.float()
        st.update(ls)
        st["f_admm"], f_cur = ls["ls_f_before"], ls["ls_f_after"]
    else:
        st["f_admm"] = f_cur = f_codes(codes)
    params0 = params
    if refit and can_refit(grid, params):  # §6 grid refresh: refit scales/zeros for the codes, re-project, polish
        st["refit_rounds_kept"] = 0
        for r in range(max(1, refit_rounds)):
            new = refit_params(grid, codes, W_hat, Hd, current=params)
            A2, O2 = (t.to(W_hat.device) for t in grid.column_affine(new, n))
            starts = [codes]
            if r > 0:  # alternate: ADMM again on the refitted grid, from the current codes
                As2, Os2 = A2 * d[None, :], O2 * d[None, :]
                starts.append(admm(Bhat, Ht, wstep, As2, Os2, grid.qmax, As2 * codes + Os2, rho0, iters, check,
                                   t_min, schedule)[0])
            c2, f2 = min(((c, _objective(A2, O2, c, W_hat, Hd)) for c in
                          (polish(c0, A2, O2, W_hat, Hd, grid.qmax, sweeps=local_search_sweeps)[0] for c0 in starts)),
                         key=lambda x: x[1])
            st.setdefault("f_refit", f2)
            if f2 >= f_cur:
                break
            codes, params, A, O, f_cur = c2.float(), new, A2, O2, f2
            st["refit_rounds_kept"] = r + 1
    best, g_idx, st["f_final"], st["chosen"] = codes, None, f_cur, "admm"
    if st["f_init"] < st["f_final"]:
        best, params, st["f_final"], st["chosen"] = init_codes, params0, st["f_init"], f"init_{init}"
    if safety_net:
        res = quantize_gptq(W, H, grid, damp=damp, static_groups=static_groups, clip_search=clip_search)
        Ag, Og = grid.column_affine(res.params, n, res.g_idx)
        cg, _ = polish(res.codes, Ag, Og, W_hat, Hd, grid.qmax, sweeps=local_search_sweeps)
        fg = _objective(Ag, Og, cg, W_hat, Hd)
        st["f_gptq_ls"] = fg
        if fg < st["f_final"]:
            best, params, g_idx, st["f_final"], st["chosen"] = cg.float(), res.params, res.g_idx, fg, "gptq+ls"
    st["seconds_total"] = time.time() - t0
    trace_rows = st.pop("trace")
    if trace:
        st["trace"] = trace_rows
    return QuantResult(best.to(torch.uint8), params, g_idx, st)


"""GPTQ (Frantar et al., 2023) on any grid, following IST-DASLab/gptq `fasterquant` (admmq.md §7.5).

1. Dead inputs (H_jj = 0): H_jj = 1, W[:, j] = 0.
2. `static_groups`: group parameters of every unit fitted up front on the original W (before any permutation).
3. `act_order`: columns in order of decreasing diag(H); W's columns and both axes of H permuted.
4. Damping H += damp·mean(diag H)·I; U = upper Cholesky factor of H⁻¹.
5. Lazy batches of `blocksize` columns; per column i: when a unit starts, its parameters are fitted on that unit's
   weights as they stood at the start of the block (dynamic groups: the reference's `find_params(W[:, i1+i:...])`,
   which does not see the updates of the block's earlier columns; GPTQModel does the same); q = nearest grid point;
   err = (w − q)/U_ii; W_block[:, i:] −= err ⊗ U[i, i:]; after the block W[:, rest] −= Err·U[block, rest].
6. Codes are returned in the original column order; with act_order and dynamic groups, `g_idx[perm[i]] = i // unit`
   (the unit whose parameters column perm[i] uses), which every GPTQ kernel reads.

Grid-generic: a unit (group) may hold several sub-units with their own (a, b) (the K-quants); units longer than the
block (Q*_K: 256) make the block a unit long, so such a unit always starts a block and sees every update.
The reconstruction error uses the runtime's value of each grid point (fp16 for GPTQ/Marlin kernels).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from . import QuantResult, nearest_codes, register


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float):
    """Dead-input fix and damping (§3 steps 1–2, shared with ADMM-Q). Returns (W, H) as new fp32 tensors."""
    W = W.float().clone()
    H = H.to(W.device, torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    return W, H


def upper_inverse_cholesky(H: torch.Tensor, damp: float):
    """U = chol(H⁻¹, upper) after H += damp·mean(diag)·I; a Hessian that is not positive definite in fp32 gets ten
    times more damping per retry (as GPTQModel does), and the damping used is reported."""
    mean = torch.diagonal(H).mean()
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Ui, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return Ui, damp
        damp = max(damp * 10, 1e-4)
    raise UserError("the layer's Hessian is not positive definite even with heavy damping",
                    "use more calibration samples (--nsamples) or a larger --damp")


def _runtime_value(grid, a, b, q):
    y = a * q + b
    return y.to(grid.runtime_dtype).float() if grid.runtime_dtype != torch.float32 else y


def _unit_columns(grid, params, unit):
    """Per-column (a, b) of one fitted unit: params [m, 1, k] -> [m, unit] each."""
    a, b = grid.affine_units(params)
    return grid._expand(a, unit)[:, 0], grid._expand(b, unit)[:, 0]


@register("gptq")
def quantize_gptq(W: torch.Tensor, H: torch.Tensor, grid, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, blocksize: int = 128, clip_search: bool = False, **_) -> QuantResult:
    if H is None:
        raise UserError("GPTQ needs calibration activations", "run it through the calibrated pipeline")
    m, n = W.shape
    n_dead = int((torch.diagonal(H) == 0).sum())
    W, Hd = prepare_hessian(W, H, 0.0)  # dead inputs first; damping after the permutation, as the reference
    unit = grid.unit(n)
    if act_order and grid.sub(n) != unit:
        raise UserError(f"grid {grid.name} has sub-scales, which act-order cannot reorder", "drop --act-order")
    weight = torch.diagonal(Hd).clone() if clip_search else None
    static = static_groups or unit == n  # per channel: one unit, fitted up front (the reference's groupsize -1)
    if static:
        params = grid.fit(W, clip_search=clip_search, weight=weight)
        A, B = grid.column_affine(params, n)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True)
        W, Hd = W[:, perm], Hd[perm][:, perm]
        if static:
            A, B = A[:, perm], B[:, perm]
    U, damp_used = upper_inverse_cholesky(Hd, damp)

    Q = torch.zeros(m, n, dtype=torch.float32, device=W.device)
    if not static:
        A = torch.zeros_like(W)
        B = torch.zeros_like(W)
        unit_params: list[dict] = []
    bs = blocksize if static else max(unit, blocksize // unit * unit)  # dynamic units never straddle a block
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % unit == 0:
                # the reference fits a group on W as of the block start (W, not the running W1)
                p = grid.fit(W[:, c:c + unit], clip_search=clip_search,
                             weight=None if weight is None else weight[perm[c:c + unit] if perm is not None else slice(c, c + unit)])
                unit_params.append(p)
                A[:, c:c + unit], B[:, c:c + unit] = _unit_columns(grid, p, unit)
            w = W1[:, i]
            q = nearest_codes(w, A[:, c], B[:, c], grid.qmax)
            Q[:, c] = q
            deq = _runtime_value(grid, A[:, c], B[:, c], q)
            d = U[c, c]
            err = (w - deq) / d
            loss += ((w - deq) ** 2 / d ** 2).double().sum() / 2
            W1[:, i:] -= err.unsqueeze(1) * U[c, c:i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if not static:
        params = {k: torch.cat([p[k] for p in unit_params], dim=1) for k in unit_params[0]}
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not static:
            g_idx = (torch.arange(n, device=W.device) // unit)[inv].int()
    return QuantResult(Q.to(torch.uint8), params, g_idx, {"gptq_loss": float(loss), "act_order": act_order,
                                                          "static_groups": static_groups, "damp": damp,
                                                          "damp_used": damp_used, "n_dead": n_dead})

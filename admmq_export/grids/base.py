"""The Grid contract between quantizers and converters.

Every grid in this project stores, for each row and each *unit* of `group_size` input columns, a few
parameters (fp16 scales, integer zero points, K-quant sub-scales, ...).  From them it derives, exactly in
fp32, an affine map per *sub-unit* of `sub_size` columns:  w = a·q + b,  q an integer code in 0..qmax.
`dequant` evaluates that map in the target runtime's own arithmetic (formats.md §0): fp32 `a·q + b`
(one rounding at most, the products are exact), optionally rounded once more to the runtime dtype (fp16
for Marlin/GPTQ kernels).  Quantizers only ever see (a, b) and codes, so a new grid needs no new quantizer.

Shapes: W is [rows, cols]; params are dicts of tensors [rows, n_units, k] with k = 1 or n_sub per unit.
"""
from __future__ import annotations

import math
from itertools import chain as chain_iter
from dataclasses import dataclass, field

import torch

from ..errors import UserError

SHRINK_STEPS = 20  # MSE clipping search: scale ranges by 1, 0.99, ... like GPTQ's `mse` option
MAX_SHRINK = 0.2
# "refit" search (llama.cpp's make_qx_quants / make_qkx2_quants idea): ranges scaled by 0.8 ... 1.1, and for each
# candidate's codes the weighted least-squares (a, b) per sub-unit, stored in the grid's own format
REFIT_FACTORS = tuple(round(0.8 + 0.0125 * i, 4) for i in range(25))
REFIT_ROUNDS = 4
CLIP_MODES = ("shrink", "refit")
# the per-sub-unit search's second family (make_qkx2_quants' rmin −1, rdelta 0.1): codes anchored at the minimum
ANCHOR_STEPS = tuple(round(-1 + 0.1 * i, 1) for i in range(21))
SUB_SEARCH_CHUNK_BYTES = 8 << 20  # fp64 weights per chunk of rows in the per-sub-unit search (its candidates: ~10x)


def keep_lower(best, err: torch.Tensor, vals: dict):
    """(error, values) keeping, element by element, whichever of `best` (None: nothing yet) and the candidate
    (err, vals) has the lower error; each value is shaped like err, plus trailing dimensions."""
    if best is None:
        return err, dict(vals)
    better = err < best[0]
    pick = lambda new, old: torch.where(better.reshape(better.shape + (1,) * (new.dim() - better.dim())), new, old)  # noqa: E731
    return torch.where(better, err, best[0]), {k: pick(v, best[1][k]) for k, v in vals.items()}


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, with its sign (llama.cpp's `max` in quantize_row_q4_0)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # columns whose parameters are fitted together (0: whole row, per channel)
    qmax: int = 0  # codes are 0..qmax
    sym: bool = False
    runtime: str = "fp32"  # dtype the runtime's dequantized weight has: fp32 | fp16
    sub_size: int = 0  # columns sharing one (a, b); 0: same as group_size
    family: str = field(default="int", compare=False)

    # ---- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description from which `grids.from_spec` rebuilds this grid."""
        raise NotImplementedError

    @property
    def runtime_dtype(self) -> torch.dtype:
        return torch.float16 if self.runtime == "fp16" else torch.float32

    # ---- shapes ---------------------------------------------------------------------------------
    def unit(self, cols: int) -> int:
        return self.group_size or cols

    def sub(self, cols: int) -> int:
        return self.sub_size or self.unit(cols)

    def check_shape(self, rows: int, cols: int, name: str = "tensor") -> None:
        g = self.unit(cols)
        if cols % g:
            raise UserError(
                f"{name} has in-dim {cols}, not divisible by the group size {g} of grid {self.name}",
                f"choose a group size that divides {cols} (e.g. --group-size {math.gcd(cols, g)} or -1 for per-channel)",
            )

    def n_units(self, cols: int) -> int:
        return cols // self.unit(cols)

    # ---- the contract -----------------------------------------------------------------------------
    def fit_units(self, Wu: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters for units Wu [rows, n_units, unit] (fp32), encoded in their storage dtype."""
        raise NotImplementedError

    def affine_units(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each [rows, n_units, n_sub] fp32, derived exactly from the stored parameters."""
        raise NotImplementedError

    def default_params(self, rows: int, n_units: int, unit: int) -> dict[str, torch.Tensor]:
        return self.fit_units(torch.zeros(rows, n_units, unit))

    # ---- generic operations -----------------------------------------------------------------------
    def fit(self, W: torch.Tensor, clip_search: bool | str = False, weight: torch.Tensor | None = None) -> dict:
        """Group parameters for W [rows, cols] from min/max, optionally with a weighted clipping search.

        clip_search: False (min/max), True or "shrink" (ranges shrunk by 1, 0.99, ..., 0.8, GPTQ's `mse` search) or
        "refit" (ranges scaled by 0.8 ... 1.1, each candidate also with the weighted least-squares scales and offsets
        for its own codes, as llama.cpp's scale search does; grids without a refit form search the ranges only).
        `weight` (cols,) weights the search error per column (e.g. diag(H)); default uniform.
        """
        rows, cols = W.shape
        g = self.unit(cols)
        Wu = W.float().reshape(rows, cols // g, g)
        params = self.fit_units(Wu)
        if not clip_search:
            return params
        mode = "shrink" if clip_search is True else clip_search
        if mode not in CLIP_MODES:
            raise UserError(f"unknown clipping search {mode!r}", f"use one of {', '.join(CLIP_MODES)}")
        w = torch.ones(cols, device=W.device) if weight is None else weight.float().clamp_min(0)
        w = w.reshape(1, cols // g, g).to(W.device)
        best = (self._unit_error(Wu, params, w), params)
        if mode == "shrink":
            factors = [1 - MAX_SHRINK * i / SHRINK_STEPS for i in range(1, SHRINK_STEPS + 1)]
        else:
            factors = list(REFIT_FACTORS)
        refit = mode == "refit" and self.refit_form() is not None
        cands = (self.fit_units(Wu * p) for p in factors)  # scale the range, quantize the true weights
        if refit and self.sub(cols) < g:  # K-quants: also the search per sub-block, encoded once at the end
            cands = chain_iter(cands, [self._sub_unit_search_rows(Wu, w, factors)])
        for cand in cands:
            chain = [cand]
            for _ in range(REFIT_ROUNDS if refit else 0):  # alternate: codes for the parameters, LS for the codes
                chain.append(self._ls_params(Wu, chain[-1], w))
            for c in chain:
                best = keep_lower(best, self._unit_error(Wu, c, w), c)
        return best[1]

    def _sub_unit_search_rows(self, Wu, w, factors):
        """_sub_unit_search over chunks of rows (rows are independent), so its candidates' memory stays bounded."""
        R, U, G = Wu.shape
        step = max(1, SUB_SEARCH_CHUNK_BYTES // (8 * U * G))
        parts = [self._sub_unit_search(Wu[r:r + step], w, factors) for r in range(0, R, step)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _sub_unit_search(self, Wu, w, factors):
        """The "refit" search run per sub-unit in fp64 before any storage rounding, as llama.cpp's make_qkx2_quants
        / make_q3_quants search each K-quant sub-block on its own: for every start (range factors; for affine grids
        also codes anchored at the minimum), codes and weighted least-squares (a, b) alternated REFIT_ROUNDS times,
        each sub-unit keeping its own best, which sets the unit's super-scales. Then, under those super-scales, each
        sub-unit takes the integer sub-scale (and min) of whichever start's (a, b) stores with the least error: two
        (a, b) of equal fp64 error (the same values on other codes) need not store equally well. A search per unit
        would make all sub-blocks of a 256-block share one factor."""
        R, U, G = Wu.shape
        S = G // self.sub(G * U)
        x = Wu.double().reshape(R, U, S, G // S)
        ww = w.double().expand(R, U, G).reshape(R, U, S, G // S)
        err_of = lambda a, b, q: (ww * (a.unsqueeze(-1) * q + b.unsqueeze(-1) - x) ** 2).sum(-1)  # noqa: E731
        starts = [tuple(t.double() for t in self.affine_units(self.fit_units(Wu * p))) for p in factors]
        if self.refit_form() == "affine":  # anchored at the minimum, the step range/(qmax + δ), δ = −1 ... 1
            lo, hi = self.sub_range(x)
            starts += [((hi - lo) / (self.qmax + dl), lo) for dl in ANCHOR_STEPS]
        else:  # the largest magnitude at either end of the codes, one step in, or in between (make_q3_quants' rmse)
            smax = signed_absmax(x)
            z, top = self.code_offset, self.qmax - self.code_offset
            for t in (-z + 1, -z + 0.5, top, top - 0.5, top - 1):
                a = smax / t
                starts.append((a, -z * a))
        best = None
        finals = []
        for a, b in starts:
            for r in range(REFIT_ROUNDS + 1):
                if r:
                    a, b = self._ls_affine(x, q, ww, a, b)
                q = self._project_sub(x, a, b)
                if self.refit_form() == "affine":  # the same values with the lowest code 0: the smallest offset,
                    b0 = b + q.amin(-1) * a  # the one that sets the super-scale of the mins
                    shifted = (b0 <= 0) if self.nonpositive_offset else torch.ones_like(b0, dtype=torch.bool)
                    if r == REFIT_ROUNDS:
                        finals.append((a, b))
                    b, q = torch.where(shifted, b0, b), q - torch.where(shifted, q.amin(-1), 0).unsqueeze(-1)
                best = keep_lower(best, err_of(a, b, q), {"a": a, "b": b})
            finals.append((a, b))
        best_a, best_b = best[1]["a"], best[1]["b"]
        params = self.store_affine(best_a.reshape(R, U * S), best_b.reshape(R, U * S))
        if self.sub_fields(params, best_a, best_b) is None:
            return params

        def stored_err(p):  # per sub-unit, of the parameters as stored, each weight on its nearest code
            sa, sb = (t.double() for t in self.affine_units(p))
            return err_of(sa, sb, self._project_sub(x, sa, sb))

        best = None
        for opt in self.super_options(best_a, best_b):  # the super-scales: the best encoding per unit
            best = keep_lower(best, stored_err(opt).sum(-1), opt)
        params = best[1]
        finals.append((best_a, best_b))
        best = None
        for a, b in finals:  # under the chosen super-scales: the best-storing (a, b) per sub-unit
            f = self.sub_fields(params, a, b)
            best = keep_lower(best, stored_err({**params, **f}), f)
        return {**params, **best[1]}

    def super_options(self, a, b):
        """Candidate storages (super-scales and the fields under them) of per-sub-unit (a, b) [R, U, S]."""
        return [self.store_affine(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))]

    def sub_fields(self, params, a, b):
        """The integer per-sub-unit fields (K-quant sub-scales, mins) that store (a, b) [R, U, S] best under the
        super-scales in `params`; None for grids without such fields."""
        return None

    def sub_range(self, x):
        """(lo, hi) per sub-unit of x [..., sub]: the range the affine fit spans (K-quants: it includes 0)."""
        return x.amin(-1), x.amax(-1)

    def _project_sub(self, x, a, b):
        """Nearest codes for per-sub-unit (a, b) [R, U, S] in fp64, x [R, U, S, sub]."""
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
        q = torch.round((x - b) / torch.where(a == 0, torch.ones_like(a), a))
        return torch.where(a == 0, torch.zeros_like(q), q).clamp(0, self.qmax)

    def _ls_affine(self, x, q, ww, a, b):
        """The weighted least-squares (a, b) per sub-unit for codes q (x, q, ww [..., sub]; a, b the fallback where
        the system is singular), within what the grid can store (`clamp_affine`)."""
        if self.refit_form() == "scale":
            q = q - self.code_offset
            den = (ww * q * q).sum(-1)
            a2 = torch.where(den > 0, (ww * x * q).sum(-1) / den.clamp_min(1e-300), a)
            return a2, -self.code_offset * a2
        s0, s1, s2 = ww.sum(-1), (ww * q).sum(-1), (ww * q * q).sum(-1)
        t0, t1 = (ww * x).sum(-1), (ww * x * q).sum(-1)
        det = s0 * s2 - s1 * s1
        ok = det > 1e-12 * (s0 * s2).clamp_min(1e-300)
        a2 = torch.where(ok, (s0 * t1 - s1 * t0) / torch.where(ok, det, 1.0), a)
        b2 = torch.where(ok, (s2 * t0 - s1 * t1) / torch.where(ok, det, 1.0), b)
        return self.clamp_affine(x, q, ww, a2, b2)

    def clamp_affine(self, x, q, ww, a, b):
        """Least-squares (a, b) moved into the grid's storable set (default: any)."""
        return a, b

    def _ls_params(self, Wu, params, w):
        """The weighted least-squares (a, b) per sub-unit for the codes `params` gives Wu, in the grid's storage."""
        R, U, G = Wu.shape
        a, b = self.affine_units(params)
        q = self._project_units(Wu, a, b).double()
        S = a.shape[-1]
        x, q, ww = (t.reshape(R, U, S, G // S) for t in (Wu.double(), q, w.double().expand(R, U, G)))
        a2, b2 = self._ls_affine(x, q, ww, a.double(), b.double())
        return self.store_affine(a2.reshape(R, U * S), b2.reshape(R, U * S))

    def _unit_error(self, Wu, params, w):
        a, b = self.affine_units(params)
        q = self._project_units(Wu, a, b)
        deq = self._dequant_units(q, a, b).float()
        return (((deq - Wu) ** 2) * w).sum(-1)

    def _expand(self, t: torch.Tensor, unit: int) -> torch.Tensor:
        """[rows, n_units, n_sub] -> [rows, n_units, unit]."""
        return t.repeat_interleave(unit // t.shape[-1], dim=-1)

    def _project_units(self, Wu, a, b):
        R, U, G = Wu.shape
        return self._project_sub(Wu.reshape(R, U, a.shape[-1], -1), a, b).reshape(R, U, G)

    def _dequant_units(self, q, a, b):
        unit = q.shape[-1]
        a, b = self._expand(a, unit), self._expand(b, unit)
        y = a * q.float() + b  # a·q is exact in fp32 for every grid here; one rounding in the add
        return y.to(self.runtime_dtype)

    def column_affine(self, params: dict, cols: int, g_idx: torch.Tensor | None = None):
        """Per-column (a, b), each [rows, cols] fp32. g_idx (act-order) maps column -> unit."""
        a, b = self.affine_units(params)
        if g_idx is None:
            unit = self.unit(cols)
            return self._expand(a, unit).reshape(a.shape[0], cols), self._expand(b, unit).reshape(b.shape[0], cols)
        if a.shape[-1] != 1:
            raise UserError(f"grid {self.name} has sub-scales and cannot use act-order", "drop --act-order")
        g_idx = g_idx.long().to(a.device)
        return a[:, g_idx, 0], b[:, g_idx, 0]

    def project(self, W: torch.Tensor, params: dict, g_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest grid point (for fixed parameters): codes uint8 [rows, cols]."""
        a, b = self.column_affine(params, W.shape[1], g_idx)
        q = self._project_units(W.float().unsqueeze(1), a.unsqueeze(1), b.unsqueeze(1)).squeeze(1)
        return q.to(torch.uint8)

    def dequant(self, codes: torch.Tensor, params: dict, g_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Weights in the target runtime's exact arithmetic (dtype `runtime_dtype`)."""
        a, b = self.column_affine(params, codes.shape[1], g_idx)
        return (a * codes.float() + b).to(self.runtime_dtype)

    def quantize_rtn(self, W: torch.Tensor, clip_search: bool = False, weight=None):
        params = self.fit(W, clip_search=clip_search, weight=weight)
        return self.project(W, params), params

    # ---- grid refresh (quantizers/refit.py) --------------------------------------------------------
    def refit_form(self) -> str | None:
        """How the grid refresh may refit each sub-unit's (a, b) for fixed codes: "scale" (w = a·(q − code_offset),
        a free), "affine" (w = a·q + b, both free) or None (not refittable)."""
        return None

    code_offset = 0  # the fixed code offset z of a "scale" grid
    nonpositive_offset = False  # an "affine" grid whose b must be <= 0 (K-quants store −dmin·m)

    def store_affine(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters in the grid's storage for sub-unit-level (a, b) [rows, cols // sub] (fp64) from the refresh."""
        raise NotImplementedError

    def bits_per_weight(self, cols: int) -> float:
        """Storage cost in bits per weight, codes + parameters (formats' own figures for GGUF)."""
        g = self.unit(cols)
        return self.bits + 32.0 / g  # fp16 scale + (packed) zero point, the GPTQ-style estimate

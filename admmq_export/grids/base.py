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
        best = self._unit_error(Wu, params, w)
        if mode == "shrink":
            factors = [1 - MAX_SHRINK * i / SHRINK_STEPS for i in range(1, SHRINK_STEPS + 1)]
        else:
            factors = list(REFIT_FACTORS)
        refit = mode == "refit" and self.refit_form() is not None
        for p in factors:
            cand = self.fit_units(Wu * p)  # scale the range, quantize the true weights
            chain = [cand]
            for _ in range(REFIT_ROUNDS if refit else 0):  # alternate: codes for the parameters, LS for the codes
                chain.append(self._ls_params(Wu, chain[-1], w))
            for c in chain:
                err = self._unit_error(Wu, c, w)
                better = err < best
                best = torch.where(better, err, best)
                for k in params:
                    params[k] = torch.where(better.unsqueeze(-1), c[k], params[k])
        return params

    def _ls_params(self, Wu, params, w):
        """The weighted least-squares (a, b) per sub-unit for the codes `params` gives Wu, in the grid's storage."""
        R, U, G = Wu.shape
        a, b = self.affine_units(params)
        q = self._project_units(Wu, a, b).double()
        S = a.shape[-1]
        x, q, ww = (t.reshape(R, U, S, G // S) for t in (Wu.double(), q, w.double().expand(R, U, G)))
        if self.refit_form() == "scale":
            q = q - self.code_offset
            den = (ww * q * q).sum(-1)
            a2 = torch.where(den > 0, (ww * x * q).sum(-1) / den.clamp_min(1e-300), a.double())
            b2 = -self.code_offset * a2
        else:
            s0, s1, s2 = ww.sum(-1), (ww * q).sum(-1), (ww * q * q).sum(-1)
            t0, t1 = (ww * x).sum(-1), (ww * x * q).sum(-1)
            det = s0 * s2 - s1 * s1
            ok = det > 1e-12 * (s0 * s2).clamp_min(1e-300)
            a2 = torch.where(ok, (s0 * t1 - s1 * t0) / torch.where(ok, det, 1.0), a.double())
            b2 = torch.where(ok, (s2 * t0 - s1 * t1) / torch.where(ok, det, 1.0), b.double())
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
        unit = Wu.shape[-1]
        a, b = self._expand(a, unit), self._expand(b, unit)
        safe = torch.where(a == 0, torch.ones_like(a), a)
        q = torch.round((Wu - b) / safe)
        q = torch.where(a == 0, torch.zeros_like(q), q)
        return q.clamp(0, self.qmax)

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

    def store_affine(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters in the grid's storage for sub-unit-level (a, b) [rows, cols // sub] (fp64) from the refresh."""
        raise NotImplementedError

    def bits_per_weight(self, cols: int) -> float:
        """Storage cost in bits per weight, codes + parameters (formats' own figures for GGUF)."""
        g = self.unit(cols)
        return self.bits + 32.0 / g  # fp16 scale + (packed) zero point, the GPTQ-style estimate

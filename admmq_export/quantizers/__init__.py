"""Quantizer registry. A quantizer maps (W, H, grid) to codes and grid parameters on that grid:

    quantize(W [out, in] fp32, H [in, in] fp32 or None, grid, **options) -> QuantResult

It never sees a file format: the grid is the whole contract (grids/base.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..plugins import load_modules


@dataclass
class QuantResult:
    codes: torch.Tensor  # uint8 [out, in]
    params: dict[str, torch.Tensor]
    g_idx: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


QUANTIZERS: dict[str, Callable[..., QuantResult]] = {}


def register(name: str):
    def deco(fn):
        QUANTIZERS[name] = fn
        return fn

    return deco


def get_quantizer(name: str):
    _load_all()
    if name not in QUANTIZERS:
        raise UserError(f"unknown method {name!r}", f"use one of {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def _load_all():
    load_modules(__name__, ("rtn", "gptq", "admmq"))


def nearest_codes(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest grid point a·q + b of every entry, as float codes in 0..qmax (a = 0: code 0)."""
    safe = torch.where(a == 0, torch.ones_like(a), a)
    q = torch.round((y - b) / safe)
    return torch.where(a == 0, torch.zeros_like(q), q).clamp(0, qmax)


def reciprocal_or_zero(a: torch.Tensor) -> torch.Tensor:
    """1/a per entry, 0 where a = 0 (a grid step of 0 admits only one point: no code moves)."""
    return torch.where(a == 0, torch.zeros_like(a), 1.0 / torch.where(a == 0, torch.ones_like(a), a))


def layer_objective(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """½·Tr((Wq−W) H (Wq−W)ᵀ) in fp64 (H None: ½‖Wq−W‖²)."""
    E = (Wq.double() - W.double())
    if H is None:
        return 0.5 * float((E * E).sum())
    return 0.5 * float(((E @ H.double()) * E).sum())

"""Round-to-nearest on any grid, with an optional MSE clipping search (weighted by diag(H) when given)."""
from __future__ import annotations

import torch

from . import QuantResult, register


@register("rtn")
def quantize_rtn(W: torch.Tensor, H: torch.Tensor | None, grid, clip_search: bool = False, **_) -> QuantResult:
    weight = torch.diagonal(H).clone() if (H is not None and clip_search) else None
    codes, params = grid.quantize_rtn(W.float(), clip_search=clip_search, weight=weight)
    return QuantResult(codes, params, None, {"clip_search": clip_search})


quantize_rtn.needs_hessian = False  # plain RTN needs no calibration activations

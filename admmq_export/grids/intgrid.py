"""GPTQ-style integer grids: w = s·(q − z), fp16 scale s per group, integer zero point z.

`IntGrid` dequantizes in fp32 (ONNX with fp32 scales, our IR); `GptqGrid` in fp16, as GPTQ kernels
(ExLlama, Triton, torch) compute `fp16(s·(q − z))`; `MarlinGrid` is the symmetric uint4b8/uint8b128 grid
that Marlin dequantizes as `fp16(s·(q − 8))` (formats.md §0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Grid


@dataclass(frozen=True)
class IntGrid(Grid):
    kind: str = "int"
    scale_dtype = torch.float16  # storage dtype of the group scales (a class constant, not a grid field)

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise UserError(f"{self.bits}-bit integer grids are not supported", "use --bits 2, 3, 4 or 8")
        object.__setattr__(self, "qmax", 2**self.bits - 1)

    @property
    def name(self) -> str:
        g = self.group_size or -1
        return f"{self.kind}{self.bits}_g{g}_{'sym' if self.sym else 'asym'}"

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    def fit_units(self, Wu):
        xmin = Wu.amin(-1).clamp(max=0)
        xmax = Wu.amax(-1).clamp(min=0)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = ((xmax - xmin) / self.qmax).to(self.scale_dtype)
        scale = torch.where(scale == 0, torch.full_like(scale, 2**-24), scale)  # fp16 subnormal floor
        if self.sym:
            zero = torch.full_like(xmin, self.code_offset)
        else:
            zero = torch.round(-xmin / scale.float()).clamp(0, self.qmax)
        return {"scale": scale.unsqueeze(-1), "zero": zero.to(torch.uint8).unsqueeze(-1)}

    def affine_units(self, params):
        s = params["scale"].float()
        return s, -s * params["zero"].float()

    def refit_form(self):
        return "scale" if self.sym else "affine"

    @property
    def code_offset(self):
        return (self.qmax + 1) // 2

    def store_affine(self, a, b):
        scale = a.clamp_min(1e-8).to(self.scale_dtype)
        scale = torch.where(scale == 0, torch.full_like(scale, 2**-24), scale)
        if self.sym:
            zero = torch.full_like(a, self.code_offset)
        else:
            zero = torch.round(-b / scale.double()).clamp(0, self.qmax)
        return {"scale": scale.unsqueeze(-1), "zero": zero.to(torch.uint8).unsqueeze(-1)}


@dataclass(frozen=True)
class GptqGrid(IntGrid):
    kind: str = "gptq"
    runtime: str = "fp16"


@dataclass(frozen=True)
class MarlinGrid(IntGrid):
    kind: str = "marlin"
    runtime: str = "fp16"
    sym: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in (4, 8) or not self.sym:
            raise UserError(
                f"Marlin holds symmetric 4- or 8-bit weights, not {self.bits}-bit {'sym' if self.sym else 'asym'}",
                "use --to marlin with --bits 4|8 --sym, or --to gptq for other grids",
            )
        if self.group_size not in (0, 32, 64, 128):
            raise UserError(f"Marlin supports groups -1/32/64/128, not {self.group_size}", "pick one of those")

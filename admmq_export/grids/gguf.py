"""GGUF block grids: the values llama.cpp's `dequantize_row_*` can produce, parameterised by the block fields.

Every grid keeps the file's own fields (fp16 `d`/`m`/`dmin`, integer sub-scales) as its parameters, so a
converter packs them verbatim.  The affine maps follow ggml-quants.c exactly (formats.md §1.5):
  Q4_0 (q−8)·d    Q5_0 (q−16)·d   Q8_0 (q−128)·d (code = int8+128)   Q4_1/Q5_1 q·d + m
  Q2_K/Q4_K/Q5_K (d·sc_j)·q − dmin·m_j     Q3_K (d·(S_j−32))·(q−4)     Q6_K (d·sc_j)·(q−32)
All products are exact in fp32; the only rounding is the final add, as in llama.cpp.
The offset types (Q4_0 Q5_0 Q8_0 Q3_K Q6_K) dequantize as a·(q − offset), llama.cpp's own order: it equals
a·q + b in value, but only this form gives llama.cpp's −0 where a < 0 and q = offset (bit-exact signed zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Grid, signed_absmax

F16 = torch.float16


def _f16(x):
    return x.to(F16)


def _safe_div(x, d):
    return x / torch.where(d == 0, torch.ones_like(d), d)


@dataclass(frozen=True)
class GGUFGrid(Grid):
    ggml_type: str = ""
    family: str = "gguf"

    @property
    def name(self) -> str:
        return f"gguf_{self.ggml_type.lower()}"

    def spec(self) -> dict:
        return {"kind": "gguf", "type": self.ggml_type}

    def bits_per_weight(self, cols: int) -> float:
        return BPW[self.ggml_type]


SUPER_STEPS = (0, 1, 2, 3, 4, 6)  # super-scale candidates: the largest sub-scale this many steps inside its range

BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5,
       "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


class _OffsetDequant:
    """w = a·(q − offset), evaluated as llama.cpp does (so a zero takes the sign of a); refitted in the scale form."""

    def refit_form(self):
        return "scale"

    @property
    def code_offset(self):
        return self.offset

    def dequant(self, codes, params, g_idx=None):
        a, _ = self.column_affine(params, codes.shape[1], g_idx)
        return (a * (codes.float() - self.offset)).to(self.runtime_dtype)

    def _dequant_units(self, q, a, b):
        return (self._expand(a, q.shape[-1]) * (q.float() - self.offset)).to(self.runtime_dtype)


@dataclass(frozen=True)
class SymBlockGrid(_OffsetDequant, GGUFGrid):
    """Q4_0, Q5_0, Q8_0: one fp16 `d` per 32, w = (q − offset)·d."""

    offset: int = 8

    def fit_units(self, Wu):
        if self.ggml_type == "Q8_0":
            d = Wu.abs().amax(-1) / 127
        else:
            d = signed_absmax(Wu) / -self.offset
        return {"d": _f16(d).unsqueeze(-1)}

    def affine_units(self, params):
        d = params["d"].float()
        return d, -self.offset * d

    def store_affine(self, a, b):
        return {"d": _f16(a).unsqueeze(-1)}


@dataclass(frozen=True)
class MinBlockGrid(GGUFGrid):
    """Q4_1, Q5_1: fp16 `d` and `m` per 32, w = q·d + m."""

    def fit_units(self, Wu):
        lo, hi = Wu.amin(-1), Wu.amax(-1)
        return {"d": _f16((hi - lo) / self.qmax).unsqueeze(-1), "m": _f16(lo).unsqueeze(-1)}

    def affine_units(self, params):
        return params["d"].float(), params["m"].float()

    def refit_form(self):
        return "affine"

    def store_affine(self, a, b):
        return {"d": _f16(a).unsqueeze(-1), "m": _f16(b).unsqueeze(-1)}


@dataclass(frozen=True)
class KMinGrid(GGUFGrid):
    """Q2_K, Q4_K, Q5_K: fp16 `d`, `dmin` per 256; unsigned sub-scale sc_j and min m_j per sub-block."""

    sc_max: int = 63  # 6-bit (Q4_K/Q5_K) or 4-bit (Q2_K)

    def fit_units(self, Wu):
        R, U, G = Wu.shape
        sub = Wu.reshape(R, U, G // self.sub_size, self.sub_size)
        lo = sub.amin(-1).clamp(max=0)
        hi = sub.amax(-1).clamp(min=0)
        return self._encode((hi - lo) / self.qmax, -lo)

    def super_options(self, a, b):
        """Candidate encodings of per-sub-block (a, b) [R, U, S]: the largest scale (min) at sub-scale sc_max − j,
        j in SUPER_STEPS, for d and for dmin in turn (llama.cpp's make_qp_quants searches d the same way)."""
        scale, mins = a.float().clamp_min(0), (-b).float().clamp_min(0)
        return [self._encode(scale, mins, self.sc_max - j, self.sc_max - k)
                for j, k in [(j, 0) for j in SUPER_STEPS] + [(0, k) for k in SUPER_STEPS[1:]]]

    def _encode(self, scale, mins, top_d=None, top_m=None):
        """Sub-block scales and mins [R, U, n_sub] (>= 0) -> fp16 d/dmin per unit and integer sc/m under them
        (the largest at top_d / top_m, default sc_max)."""
        d = _f16(scale.amax(-1) / (top_d or self.sc_max))
        dmin = _f16(mins.amax(-1) / (top_m or self.sc_max))
        sc = torch.round(_safe_div(scale, d.float().unsqueeze(-1))).clamp(0, self.sc_max)
        m = torch.round(_safe_div(mins, dmin.float().unsqueeze(-1))).clamp(0, self.sc_max)
        return {"d": d.unsqueeze(-1), "dmin": dmin.unsqueeze(-1), "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)}

    def affine_units(self, params):
        a = params["d"].float() * params["sc"].float()
        b = -(params["dmin"].float() * params["m"].float())
        return a, b

    def sub_fields(self, params, a, b):
        sc = torch.round(_safe_div(a, params["d"].double())).clamp(0, self.sc_max)
        m = torch.round(_safe_div(-b, params["dmin"].double())).clamp(0, self.sc_max)
        return {"sc": sc.to(torch.uint8), "m": m.to(torch.uint8)}

    def refit_form(self):
        return "affine"

    nonpositive_offset = True

    def sub_range(self, x):
        return x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)

    def clamp_affine(self, x, q, ww, a, b):
        """The min is stored as −dmin·m ≤ 0: where the least-squares offset is positive, the best scale with offset 0
        (llama.cpp's make_qkx2_quants does the same); a negative scale is stored as 0."""
        pos = b > 0
        den = (ww * q * q).sum(-1)
        a0 = torch.where(den > 0, (ww * x * q).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(a))
        return torch.where(pos, a0, a).clamp_min(0), torch.where(pos, torch.zeros_like(b), b)

    def store_affine(self, a, b):
        """Per-sub-block (a, b) [rows, n_sub_total] -> a new d/dmin and the sub-scales/mins under them (a < 0 or
        b > 0 cannot be stored: clamped to 0)."""
        R = a.shape[0]
        shape = (R, -1, self.group_size // self.sub_size)
        return self._encode(a.float().clamp_min(0).reshape(shape), (-b).float().clamp_min(0).reshape(shape))


@dataclass(frozen=True)
class KSymGrid(_OffsetDequant, GGUFGrid):
    """Q3_K (6-bit signed scales, code offset 4) and Q6_K (int8 scales, offset 32): w = (d·sc_j)·(q − offset)."""

    offset: int = 4
    sc_lo: int = -32
    sc_hi: int = 31

    def fit_units(self, Wu):
        R, U, G = Wu.shape
        sub = Wu.reshape(R, U, G // self.sub_size, self.sub_size)
        return self._encode(signed_absmax(sub) / -self.offset)

    def super_options(self, a, b):
        """Candidate encodings of per-sub-block scales a [R, U, S]: the largest magnitude at sub-scale sc_lo + j or
        sc_hi − j, j in SUPER_STEPS."""
        scale = a.float()
        return ([self._encode(scale, self.sc_lo + j) for j in SUPER_STEPS] +
                [self._encode(scale, self.sc_hi - j) for j in SUPER_STEPS])

    def _encode(self, scale, top=None):
        """Signed sub-block scales [R, U, n_sub] -> fp16 d per unit and the integer sub-scales under it, as
        quantize_row_q3_K/q6_K do: the scale of largest magnitude maps to sc_lo (−32 / −128; or `top`), so d takes
        the sign that gives the negative side's extra step to it (a positive d would clamp it to sc_hi = −sc_lo − 1)."""
        smax = signed_absmax(scale)
        top = top or self.sc_lo
        iscale = torch.where(smax == 0, torch.zeros_like(smax), top / torch.where(smax == 0, 1.0, smax))
        d = _f16(torch.where(iscale == 0, torch.zeros_like(iscale), 1 / torch.where(iscale == 0, 1.0, iscale)))
        sc = torch.round(scale * iscale.unsqueeze(-1)).clamp(self.sc_lo, self.sc_hi)
        return {"d": d.unsqueeze(-1), "sc": sc.to(torch.int8)}

    def affine_units(self, params):
        a = params["d"].float() * params["sc"].float()
        return a, -self.offset * a

    def sub_fields(self, params, a, b):
        return {"sc": torch.round(_safe_div(a, params["d"].double())).clamp(self.sc_lo, self.sc_hi).to(torch.int8)}

    def store_affine(self, a, b):
        return self._encode(a.float().reshape(a.shape[0], -1, self.group_size // self.sub_size))


def _grids():
    return {
        "Q4_0": SymBlockGrid(bits=4, group_size=32, qmax=15, offset=8, ggml_type="Q4_0"),
        "Q5_0": SymBlockGrid(bits=5, group_size=32, qmax=31, offset=16, ggml_type="Q5_0"),
        "Q8_0": SymBlockGrid(bits=8, group_size=32, qmax=255, offset=128, ggml_type="Q8_0"),
        "Q4_1": MinBlockGrid(bits=4, group_size=32, qmax=15, ggml_type="Q4_1"),
        "Q5_1": MinBlockGrid(bits=5, group_size=32, qmax=31, ggml_type="Q5_1"),
        "Q2_K": KMinGrid(bits=2, group_size=256, sub_size=16, qmax=3, sc_max=15, ggml_type="Q2_K"),
        "Q4_K": KMinGrid(bits=4, group_size=256, sub_size=32, qmax=15, sc_max=63, ggml_type="Q4_K"),
        "Q5_K": KMinGrid(bits=5, group_size=256, sub_size=32, qmax=31, sc_max=63, ggml_type="Q5_K"),
        "Q3_K": KSymGrid(bits=3, group_size=256, sub_size=16, qmax=7, offset=4, sc_lo=-32, sc_hi=31, ggml_type="Q3_K"),
        "Q6_K": KSymGrid(bits=6, group_size=256, sub_size=16, qmax=63, offset=32, sc_lo=-128, sc_hi=127, ggml_type="Q6_K"),
    }


GGUF_GRIDS = _grids()

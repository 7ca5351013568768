"""Grid registry: build a grid from its spec (what the IR stores) or from CLI options."""
from __future__ import annotations

from ..errors import UserError
from .base import Grid
from .gguf import GGUF_GRIDS, GGUFGrid
from .intgrid import GptqGrid, IntGrid, MarlinGrid

INT_KINDS = {"int": IntGrid, "gptq": GptqGrid, "marlin": MarlinGrid}


def from_spec(spec: dict) -> Grid:
    kind = spec.get("kind")
    if kind == "gguf":
        t = spec["type"].upper()
        if t not in GGUF_GRIDS:
            raise UserError(f"GGUF type {t} has no grid", f"use one of {', '.join(GGUF_GRIDS)}")
        return GGUF_GRIDS[t]
    if kind in INT_KINDS:
        return INT_KINDS[kind](bits=int(spec["bits"]), group_size=int(spec["group_size"]), sym=bool(spec["sym"]))
    raise UserError(f"unknown grid kind {kind!r}", f"use one of {', '.join([*INT_KINDS, 'gguf'])}")


def int_grid(kind: str, bits: int, group_size: int, sym: bool) -> Grid:
    return from_spec({"kind": kind, "bits": bits, "group_size": 0 if group_size in (-1, 0) else group_size, "sym": sym})


def all_grids() -> list[Grid]:
    """One instance of every registered grid (for tests and the support matrix)."""
    out: list[Grid] = []
    for kind in ("int", "gptq"):
        for bits in (2, 3, 4, 8):
            for sym in (True, False):
                out.append(int_grid(kind, bits, 32, sym))
    out += [int_grid("marlin", b, g, True) for b in (4, 8) for g in (0, 128)]
    out += list(GGUF_GRIDS.values())
    return out


__all__ = ["Grid", "GGUFGrid", "IntGrid", "GptqGrid", "MarlinGrid", "GGUF_GRIDS", "from_spec", "int_grid", "all_grids"]

"""What a converter is: a grid plan (which grid each tensor is quantized on) and a writer that packs codes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from admmq_export.grids import Grid, int_grid
from admmq_export.ir import QuantizedModel


@dataclass
class QuantOptions:
    bits: int = 4
    group_size: int = 128
    sym: bool = True


def is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


class Converter:
    name = ""
    output_is_dir = False
    grid_kind = "int"  # grid family for --bits/--group-size/--sym
    types: tuple[str, ...] = ()  # accepted TYPE values after the colon

    def plan(self, typ: str | None, q: QuantOptions):
        """(weight name, shape) -> Grid or None; decoder linears only, by default."""
        grid = int_grid(self.grid_kind, q.bits, q.group_size, q.sym)

        def plan(name: str, shape: tuple) -> Grid | None:
            return grid if is_decoder_linear(name) else None

        return plan

    def fallback(self, grid: Grid, shape: tuple, mode: str) -> Grid | None:
        """The grid for a tensor whose in-dim `grid` cannot hold: per-channel, or None (keep float)."""
        if mode == "per-channel":
            return dataclasses.replace(grid, group_size=0)
        return None

    def planned(self, typ: str | None, q: QuantOptions, mode: str = "error", config: dict | None = None):
        """`plan` with the explicit, reported fallback for shapes the grid cannot hold (never silent).

        `config` (the model's HF config, once loaded) is for formats whose per-tensor choice depends on the model."""
        base = self.plan(typ, q)
        report: dict[str, str] = {}

        def plan(name: str, shape: tuple) -> Grid | None:
            grid = base(name, shape)
            if grid is None or mode == "error" or shape[1] % grid.unit(shape[1]) == 0:
                return grid
            fb = self.fallback(grid, shape, mode)
            report[name] = f"in-dim {shape[1]} not divisible by {grid.unit(shape[1])}: {grid.name} -> {fb.name if fb else 'kept in float'}"
            return fb

        plan.fallbacks = report  # type: ignore[attr-defined]
        return plan

    def write(self: QuantizedModel, tmp_out: Path, typ: str | None) -> dict:
        """Write the file(s) at tmp_out (renamed into place by the caller); return a short report."""
        raise NotImplementedError

    def support(self) -> list[dict]:
        """Rows of the support matrix: format, bits, group sizes, sym/asym, notes."""
        return []

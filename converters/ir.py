"""`--to ir`: the QuantizedModel folder itself."""
from __future__ import annotations

import shutil
from pathlib import Path

from . import register
from .base import Converter


class IRConverter(Converter):
    name = "ir"
    output_is_dir = True
    grid_kind = "int"

    def write(self, ir, tmp_out: Path, typ):
        shutil.rmtree(tmp_out, ignore_errors=True)
        ir._write_new(tmp_out)
        return {"linears": len(ir.linears)}

    def support(self):
        return [{"format": "ir", "bits": "2,3,4,8", "group_size": "-1, any divisor of in-dim", "sym": "sym, asym",
                 "dequant": "fp32 s·(q−z)", "notes": "the intermediate representation"}]


register(IRConverter())

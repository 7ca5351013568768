"""Read a written file back with third-party code and compare every tensor with its IR, bit for bit.

Each format registers a checker: (detect(path) -> bool, check(path, ir) -> rows). A row is
{"tensor", "checker", "status": exact|differs|not representable, "exact", "n_diff", "max_ulp", "reason"}.
"""
from __future__ import annotations

from pathlib import Path

import torch

from admmq_export.errors import UserError
from admmq_export.fakequant import ir_path_for, is_ir_dir
from admmq_export.ir import QuantizedModel
from admmq_export.plugins import load_modules

CHECKERS: list = []
_MODULES = ("gguf", "gptq", "onnx")


def register(detect, check):
    CHECKERS.append((detect, check))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, as signed integers of the same width."""
    itype = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.contiguous().view(itype)


def compare(tensor: str, checker: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    """Bit-level comparison in the IR's runtime dtype."""
    if tuple(got.shape) != tuple(want.shape):
        return {"tensor": tensor, "checker": checker, "status": "differs", "exact": False, "n_diff": -1,
                "max_ulp": None, "reason": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
    gi, wi = bits(got.to(want.dtype)).long(), bits(want).long()
    diff = gi != wi
    n = int(diff.sum())
    ulp = int((gi - wi).abs().max()) if n else 0
    return {"tensor": tensor, "checker": checker, "status": "exact" if n == 0 else "differs", "exact": n == 0,
            "n_diff": n, "max_ulp": ulp, "reason": ""}


def check_ir(path: Path, ir: QuantizedModel) -> list[dict]:
    """An IR against its own manifest (hashes of codes and dequantized weights)."""
    bad = set(ir.verify_manifest())
    rows = []
    for k in sorted(ir.linears):
        ok = k not in bad
        rows.append({"tensor": k, "checker": "ir-manifest", "status": "exact" if ok else "differs", "exact": ok,
                     "n_diff": 0 if ok else -1, "max_ulp": 0 if ok else None, "reason": "" if ok else "sha256 mismatch"})
    return rows


def check_output(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist", "pass a file written by admmq-export")
    ir_dir = ir_path_for(p)
    if not is_ir_dir(ir_dir):
        raise UserError(f"no IR found for {p} (expected {ir_dir})", "check outputs written by admmq-export, next to their .ir folder")
    ir = QuantizedModel.load(ir_dir)
    if is_ir_dir(p):
        return check_ir(p, ir)
    load_modules(__name__, _MODULES)
    rows = check_ir(ir_dir, ir)
    for detect, check in CHECKERS:
        if detect(p):
            return rows + check(p, ir)
    raise UserError(f"no checker knows the format of {p}", "see `admmq-export formats` for what can be checked")


def format_table(rows: list[dict]) -> str:
    out = [f"{'tensor':60s} {'checker':18s} {'status':17s} {'n_diff':>8s} {'max_ulp':>8s}"]
    for r in rows:
        out.append(f"{r['tensor'][:60]:60s} {r['checker']:18s} {r['status']:17s} {str(r['n_diff']):>8s} {str(r['max_ulp']):>8s}"
                   + (f"  {r['reason']}" if r.get("reason") else ""))
    return "\n".join(out)

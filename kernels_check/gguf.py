"""GGUF files against their IR: every tensor read back by gguf-py (`gguf.quants.dequantize`) and by llama.cpp's own
ggml `to_float` (ggml_ctypes.py, the library llama-cpp-python ships), compared bit for bit with the IR's weight
in the file's layout (llama's Q/K rows permuted, gemma3 norms + 1). Float tensors: the IR value in the file's
float type (F32 exact; F16/BF16 one rounding, which is the type the preset asks for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from . import compare, register

def _ir_values(ir):
    """GGUF name -> (fp32 tensor the file must hold, how)."""
    from converters.gguf import file_value
    from converters.gguf_layout import ordered_names, to_file_layout

    out = {}
    for hf, g in ordered_names([*ir.tensors, *ir.linears], ir.config):
        if hf in ir.linears:
            out[g] = (to_file_layout(g, ir.linears[hf].dequant().float(), ir.config), None)
        else:
            out[g] = (to_file_layout(g, ir.tensors[hf], ir.config), file_value)
    return out


def check(path: Path, ir) -> list[dict]:
    from . import ggml_ctypes

    reader = GGUFReader(str(path))
    want = _ir_values(ir)
    ok, why = ggml_ctypes.available()
    rows = []
    seen = set()
    for t in reader.tensors:
        name = t.name
        seen.add(name)
        if name not in want:
            rows.append({"tensor": name, "checker": "gguf-py", "status": "differs", "exact": False, "n_diff": -1,
                         "max_ulp": None, "reason": "tensor not in the IR"})
            continue
        ref, rounding = want[name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF ne order -> numpy [rows, cols]
        qtype = GGMLQuantizationType(int(t.tensor_type))
        target = ref if rounding is None else rounding(ref, qtype.name)
        got = torch.from_numpy(np.asarray(dequantize(t.data, qtype), dtype=np.float32).reshape(shape).copy())
        rows.append({**compare(name, f"gguf-py {qtype.name}", got, target.reshape(shape))})
        if qtype == GGMLQuantizationType.F32:  # nothing for ggml to decode
            continue
        if not ok:
            rows.append({"tensor": name, "checker": "ggml to_float", "status": "unavailable", "exact": False,
                         "n_diff": None, "max_ulp": None, "reason": f"skipped: {why}"})
            continue
        got = torch.from_numpy(ggml_ctypes.dequantize(np.asarray(t.data), qtype, shape))
        rows.append(compare(name, f"ggml {qtype.name}", got, target.reshape(shape)))
    for name in sorted(set(want) - seen):
        rows.append({"tensor": name, "checker": "gguf-py", "status": "differs", "exact": False, "n_diff": -1,
                     "max_ulp": None, "reason": "tensor missing from the file"})
    return rows


def detect(path: Path) -> bool:
    return Path(path).suffix == ".gguf" and Path(path).is_file()


register(detect, check)

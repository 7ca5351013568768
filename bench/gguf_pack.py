"""GGUF packing throughput (issue 9): our RTN fit on the GGUF grids + block packer (converters/gguf_pack.py) vs
gguf-py's `quants.quantize` and libgguf's reference quantizer, on the same fp32 tensors; bytes compared."""
from __future__ import annotations

import os
import time
from importlib.metadata import version

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from admmq_export.grids import GGUF_GRIDS
from admmq_export.quantizers import get_quantizer
from converters.gguf_pack import pack

from .common import machine, md_table, save_section

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]  # SmolLM2-135M down_proj and up_proj, a 7B attention projection
MB = 1e6


def _best(fn, reps: int):
    """(fastest wall seconds of `reps` calls, last result)."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _libgguf():
    os.environ["LIBGGUF_NUM_THREADS"] = "1"  # read by its native row kernels
    try:
        import libgguf

        return libgguf, None
    except Exception as e:  # noqa: BLE001 - optional peer: the suite reports it and goes on
        return None, f"{type(e).__name__}: {e}"


def _same(a: np.ndarray, b: np.ndarray | None) -> str:
    if b is None:
        return "-"
    if a.shape == b.shape and np.array_equal(a, b):
        return "yes"
    return f"no ({100 * np.mean(a == b):.1f} % bytes equal)" if a.shape == b.shape else "no (size differs)"


def _mse(raw: np.ndarray | None, t: str, x: np.ndarray) -> float | None:
    return None if raw is None else float(np.mean((quants.dequantize(raw, GGMLQuantizationType[t]) - x) ** 2))


def _case(x: np.ndarray, t: str, reps: int, lib) -> dict:
    W, grid, rtn = torch.from_numpy(x), GGUF_GRIDS[t], get_quantizer("rtn")

    def fit_pack():
        res = rtn(W, None, grid)  # what `--method rtn` does on the type's grid: fp16 block fields + nearest codes
        return pack(t, res.codes, res.params)

    s_ours, ours = _best(fit_pack, reps)
    r = rtn(W, None, grid)
    s_pack, _ = _best(lambda: pack(t, r.codes, r.params), reps)
    try:
        s_py, py = _best(lambda: quants.quantize(x, GGMLQuantizationType[t]), reps)
    except NotImplementedError:
        s_py, py = None, None
    s_lib, ref = _best(lambda: lib.quantize_rows(x, lib.GGMLQuantizationType[t]), reps) if lib else (None, None)
    out_mb, in_mb = ours.nbytes / MB, x.nbytes / MB
    rate = lambda s, mb: None if s is None else mb / s  # noqa: E731
    return {"shape": f"{x.shape[0]}x{x.shape[1]}", "type": t, "in_MB": in_mb, "out_MB": out_mb,
            "s_ours_rtn_pack": s_ours, "s_ours_pack": s_pack, "s_ggufpy": s_py, "s_libgguf": s_lib,
            "out_MBps_ours_rtn_pack": rate(s_ours, out_mb), "out_MBps_ours_pack": rate(s_pack, out_mb),
            "out_MBps_ggufpy": rate(s_py, out_mb), "out_MBps_libgguf": rate(s_lib, out_mb),
            "in_MBps_ours_rtn_pack": rate(s_ours, in_mb), "in_MBps_ggufpy": rate(s_py, in_mb),
            "in_MBps_libgguf": rate(s_lib, in_mb),
            "same_as_ggufpy": _same(ours, py), "same_as_libgguf": _same(ours, ref),
            "ggufpy_same_as_libgguf": _same(py, ref) if py is not None else "-",
            "mse_ours": _mse(ours, t, x), "mse_ggufpy": _mse(py, t, x), "mse_libgguf": _mse(ref, t, x)}


def _cell(r: dict, side: str) -> str:
    """'out MB/s (in MB/s)' of one side, '-' where it cannot quantize the type."""
    out, inp = r[f"out_MBps_{side}"], r.get(f"in_MBps_{side}")
    return "-" if out is None else f"{out:.0f}" + (f" ({inp:.0f})" if inp else "")


def run(quick: bool = False) -> None:
    shapes, reps = (SHAPES[:1], 1) if quick else (SHAPES, 3)
    lib, lib_error = _libgguf()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread for every side (gguf-py is single-threaded numpy)
    try:
        rng = np.random.default_rng(0)
        rows = []
        for shape in shapes:
            x = rng.normal(0, 0.02, shape).astype(np.float32)
            block = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] for t in TYPES}
            rows += [_case(x, t, reps, lib) for t in TYPES if shape[1] % block[t] == 0]
    finally:
        torch.set_num_threads(threads)
    table = [{**r, "ours RTN+pack": _cell(r, "ours_rtn_pack"), "ours pack": _cell(r, "ours_pack"),
              "gguf-py": _cell(r, "ggufpy"), "libgguf": _cell(r, "libgguf")} for r in rows]
    both = [r for r in rows if r["ggufpy_same_as_libgguf"] != "-"]
    agree = f"{sum(r['ggufpy_same_as_libgguf'] == 'yes' for r in both)} of {len(both)} cases where both ran"
    lib_note = (f"libgguf {version('libgguf')}: "
                "`libgguf.quantize_rows(x, qtype)` (llama.cpp's reference row quantizers, no imatrix)." if lib else
                f"**libgguf is not available ({lib_error})**: its columns are empty; "
                "`pip install 'admmq-export[bench]'`.")
    cmd = f"python -m bench --suite gguf_pack{' --quick' if quick else ''}"
    md = [f"## GGUF packing throughput vs gguf-py and libgguf (`{cmd}`)",
          "",
          "Same Gaussian fp32 tensors (σ = 0.02; SmolLM2-135M down/up projection shapes and a 7B attention "
          "projection) quantized to each GGUF type by: *ours RTN+pack* = the `rtn` quantizer on the type's GGUF "
          "grid (fp16 block fields + nearest codes) then `converters/gguf_pack.pack`; *ours pack* = the packer "
          "alone, on those codes; gguf-py `quants.quantize` (numpy, 32-element types only); and " + lib_note + " "
          f"Cells: MB/s of packed bytes written (MB/s of fp32 input read), best of {reps}, one thread each "
          "(torch.set_num_threads(1), LIBGGUF_NUM_THREADS=1); K types skip in-dims that are not a multiple of 256. "
          "*same as*: whether our bytes equal theirs; MSE: reconstruction error after `gguf.quants.dequantize`. "
          "For the 32-element types our block fields (d, m) match llama.cpp's, but we round codes to the nearest "
          "point of the stored fp16 scale while llama.cpp divides by its fp32 scale, so a few codes differ; for K "
          "types llama.cpp's reference searches sub-block scales iteratively (make_qkx2_quants, make_q3_quants, "
          "make_qx_quants), so its bytes differ (compare the MSE columns). "
          f"gguf-py's bytes equal libgguf's in {agree}.",
          "",
          md_table(table, ["shape", "type", "out_MB", "ours RTN+pack", "ours pack", "gguf-py", "libgguf",
                           "same_as_ggufpy", "same_as_libgguf", "mse_ours", "mse_libgguf"]),
          "",
          f"Machine: {machine()}"]
    save_section("gguf_pack", "\n".join(md), {"rows": rows, "reps": reps, "libgguf_error": lib_error,
                                              "machine": machine()})

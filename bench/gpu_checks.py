"""Real GPU kernels on our written files (issues 5 (c) and 11): every quantized tensor of each file through every
CUDA kernel of `admmq-export check --gpu`'s table (Marlin fp16/bf16, torch int4/int8, GPTQModel's TritonV2 dequant,
ggml-cuda), compared bit for bit with the IR's weight in that kernel's arithmetic.

The files are slices (`python -m kernels_check.slice`) of benchmark outputs: a few real layers of each written file,
their bytes copied verbatim, small enough for the GPU host's transfer limit. Set ADMMQ_GPU_SLICES to check other
files (any folder of `<output>.slice.json` + `<output>` + `<output>.ir`). Without CUDA the section says so.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from .common import RESULTS, ROOT, machine, md_table, save_section

TITLE = "## Real GPU kernels on our files (`python -m bench --suite gpu_checks`)"  # --quick changes nothing here
SLICES = Path(os.environ.get("ADMMQ_GPU_SLICES", ROOT / "bench" / "out" / "gpu_slices"))


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (file, kernel): counts by status, worst ulp, the reasons seen."""
    from kernels_check import gpu

    out: dict = {}
    for r in rows:
        s = out.setdefault((r["file"], r["kernel"]), {"file": r["file"], "kernel": r["kernel"], "tensors": 0, "exact": 0,
                                                      "differs": 0, gpu.SIGNED_ZERO: 0, "not representable": 0, "unavailable": 0,
                                                      "max ulp": None, "reasons": set()})
        s["tensors"] += 1
        s[r["status"]] += 1
        if r.get("max_ulp") is not None and r["status"] == "differs":
            s["max ulp"] = max(s["max ulp"] or 0, r["max_ulp"])
        if r.get("reason"):
            s["reasons"].add(r["reason"][:160])
    for s in out.values():
        s["reasons"] = "; ".join(sorted(s["reasons"]))
    return list(out.values())


def rerender() -> None:
    """`python -m bench.gpu_checks`: the section again from the recorded rows (bench/results/gpu_checks.json)."""
    doc = json.loads((RESULTS / "gpu_checks.json").read_text())
    render(doc["machine"], doc["files"], doc["rows"])


def run(quick: bool = False) -> None:
    from admmq_export.fakequant import ir_path_for
    from admmq_export.ir import QuantizedModel
    from kernels_check import gpu

    if not torch.cuda.is_available():
        save_section("gpu_checks", f"{TITLE}\n\nNo CUDA device in this run (torch {torch.__version__}): nothing was "
                     "checked on GPU kernels. Run this suite on a CUDA host (see kernels_check/gpu.py).",
                     {"cuda": False})
        return
    info = {**machine(), "device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "driver": _driver()}
    kernels = sorted((k for k in gpu.kernels() if k.device == "cuda"), key=lambda k: ("marlin" in k.name, "ggml" in k.name))
    rows, files = [], []
    for sj in sorted(SLICES.glob("*.slice.json")):
        meta = json.loads(sj.read_text())
        out = sj.with_name(sj.name[: -len(".slice.json")])
        ir = QuantizedModel.load(ir_path_for(out))
        ts = gpu.tensors_from_file(out, ir)
        files.append({"file": out.name, "from": Path(meta["source"]).name, "keep": meta["keep"], "tensors": len(ts)})
        for k in kernels:
            for t in ts:
                if isinstance(t, k.form):
                    rows.append({"file": out.name, **gpu.check_one(t, k, "cuda")})
        (SLICES.parent / "gpu_checks_rows.json").write_text(json.dumps(rows, default=str))  # progress, if the run is cut
    render(info, files, rows)


def explain(rows: list[dict]) -> None:
    """For each differing GGUF row: how many elements of the IR's weight are -0 (`ir_neg_zeros`), read from the same
    slice on this machine. n_diff equal to it, with max ulp 2^31 (the sign bit), is the identity-GEMM probe's +0 for
    the IR's -0 (runs before `SIGNED_ZERO` was classified by the check itself record only `differs`)."""
    from admmq_export.fakequant import ir_path_for
    from admmq_export.ir import QuantizedModel
    from kernels_check import gpu

    cache: dict = {}
    for r in rows:
        if r["status"] != "differs" or not r["file"].endswith(".gguf") or "ir_neg_zeros" in r:
            continue
        out = SLICES / r["file"]
        if not out.exists():
            continue
        if out not in cache:
            cache[out] = {t.name: t for t in gpu.tensors_from_file(out, QuantizedModel.load(ir_path_for(out)))}
        tg = cache[out][r["tensor"]].target
        r["ir_neg_zeros"] = int(((tg == 0) & torch.signbit(tg)).sum())


def render(info: dict, files: list[dict], rows: list[dict]) -> None:
    from kernels_check import gpu

    explain(rows)
    summ = summarise(rows)
    ran = [s for s in summ if s["exact"] + s["differs"] + s[gpu.SIGNED_ZERO]]
    diffs = [r for r in rows if r["status"] == "differs"]
    zeros = [r for r in diffs if r.get("ir_neg_zeros") == r["n_diff"] and r["max_ulp"] == 2**31]
    md = [TITLE, "",
          f"{info['device']}, driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}. Each file is a slice of a "
          "benchmark output (`python -m kernels_check.slice`: the named layers' bytes copied verbatim, with the IR's "
          "codes for them). A kernel's weight is read with the identity-matrix probe (Marlin, torch int4/int8, ggml-cuda "
          "MUL_MAT at F32 precision with TF32 off) or its own dequantizer (TritonV2, ggml-cuda GET_ROWS) and compared bit "
          "for bit with the IR's weight in that kernel's arithmetic (odt((q-z)*sdt(s)) for GPTQ; the fp32 IR value for "
          "GGUF). `exact` = 0 differing bits.", "",
          md_table(files, ["file", "from", "keep", "tensors"]), "",
          md_table(summ, ["file", "kernel", "tensors", "exact", gpu.SIGNED_ZERO, "differs", "not representable", "unavailable",
                          "max ulp", "reasons"]), "",
          f"Kernel/tensor pairs run: {sum(s['exact'] + s['differs'] + s[gpu.SIGNED_ZERO] for s in ran)}; exact: "
          f"{sum(s['exact'] for s in ran)}; {gpu.SIGNED_ZERO}: {sum(s[gpu.SIGNED_ZERO] for s in ran)}; differing: "
          f"{len(diffs)}."]
    if diffs:
        md += ["", "Differing pairs, with the number of -0 elements in the IR's weight of that tensor (counted on the "
               "same slice): " + "; ".join(f"{r['file']} {r['tensor']} ({r['kernel'].split()[0]}): n_diff {r['n_diff']}, "
                                           f"max ulp {r['max_ulp']}, IR -0 {r.get('ir_neg_zeros', '?')}" for r in diffs) + ".",
               f"In {len(zeros)} of {len(diffs)}, n_diff equals the number of the IR's -0 elements and the largest "
               "difference is the sign bit (2^31 ulp): every -0 read back as +0. They are K-quant tensors (Q3_K/Q6_K, whose llama.cpp dequantization d·sc·(q−offset) gives -0 "
               "where d·sc < 0 and q = offset; ggml-cpu and gguf-py reproduce those -0 bit for bit), and CUDA has no "
               "GET_ROWS for K-quants, so they are read through MUL_MAT(w, I), where -0·1 summed with +0 products is +0. "
               "That run predates the per-element classification; the check now tests it element by element itself and reports "
               f"`{gpu.SIGNED_ZERO}` (kernels_check/gpu.py `zero_sign_only`)."]
    md += ["", f"Machine: {info}"]
    save_section("gpu_checks", "\n".join(md), {"machine": info, "files": files, "summary": summ, "rows": rows})


if __name__ == "__main__":
    rerender()

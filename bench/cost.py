"""Cost of the quantizers on LLM-sized layers (issues 3 and 10): GPTQ vs ADMM-Q wall time and peak memory on
synthetic but realistic problems — Gaussian weights, activations with correlated channels and 1% outlier
channels (x5) — at W4 and W3 (asym, g128). On CUDA (the device tool's GPU machine) all three Llama-8B shapes run;
on this 2-core CPU only the 4096 x 4096 layer runs (the 14336-row and 14336-column ones are left out and said so)."""
from __future__ import annotations

import resource
import time

import torch

from admmq_export.grids import int_grid
from admmq_export.quantizers import get_quantizer, layer_objective

from .common import machine, md_table, save_section

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in): q/o_proj, gate/up_proj, down_proj


def problem(m: int, n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.02
    k = 256  # low-rank correlation + noise: H = XᵀX/N of N tokens without materialising X
    F = torch.randn(n, k, generator=g) / k ** 0.5
    scale = torch.ones(n)
    scale[torch.randperm(n, generator=g)[: n // 100]] = 5.0
    H = (F @ F.T + 0.1 * torch.eye(n)) * scale[:, None] * scale[None, :]
    return W.to(device), H.to(device)


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return out, time.perf_counter() - t, mem


def run(quick: bool = False) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SHAPES if device.type == "cuda" else SHAPES[:1]
    if quick:
        shapes = [(1024, 1024)]
    if device.type == "cuda":  # CUDA context, cuBLAS/cuSOLVER handles and kernels loaded outside the timings
        _row(*problem(256, 256, device), 256, 256, 4, device)
    rows = []
    for m, n in shapes:
        W, H = problem(m, n, device)
        for bits in (4, 3):
            try:
                rows.append(_row(W, H, m, n, bits, device))
            except Exception as e:  # noqa: BLE001 - a failed problem is recorded, the others still run
                rows.append({"layer (out x in)": f"{m} x {n}", "grid": f"W{bits} g128 asym", "device": device.type,
                             "error": f"{type(e).__name__}: {str(e)[:160]}"})
            _save(rows, device, quick)
        del W, H
    _save(rows, device, quick)


def _row(W, H, m, n, bits, device) -> dict:
    grid = int_grid("int", bits, 128, False)
    rg, tg, mg = _time(lambda: get_quantizer("gptq")(W, H, grid), device)
    ra, ta, ma = _time(lambda: get_quantizer("admmq")(W, H, grid), device)
    rr = get_quantizer("rtn")(W, H, grid)
    fr = layer_objective(W, grid.dequant(rr.codes, rr.params).float(), H)
    fg = layer_objective(W, grid.dequant(rg.codes, rg.params).float(), H)
    fa = layer_objective(W, grid.dequant(ra.codes, ra.params).float(), H)
    return {"layer (out x in)": f"{m} x {n}", "grid": f"W{bits} g128 asym", "device": device.type,
            "GPTQ s": tg, "ADMM-Q s": ta, "ratio": ta / tg, "ADMM iters": ra.stats["admm_iters"],
            "of which ADMM s": ra.stats["admm_seconds"], "of which polish s": ra.stats["seconds_total"] - ra.stats["admm_seconds"],
            "f GPTQ/RTN": fg / fr, "f ADMM-Q/RTN": fa / fr, "GPU MiB GPTQ": mg, "GPU MiB ADMM-Q": ma}


def _save(rows: list[dict], device, quick: bool) -> None:
    cuda = device.type == "cuda"
    where = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if cuda else "CPU"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    md = [f"## Cost on LLM-sized layers, {'GPU' if cuda else 'CPU'} (`python -m bench --suite cost{' --quick' if quick else ''}`"
          f"{' on a CUDA host' if cuda else ''})", "",
          "Synthetic problems (Gaussian W; H from correlated activations with 1% outlier channels x5), one layer at a "
          f"time on {where}, fp32 GEMMs (TF32 off on CUDA). ADMM-Q with the spec defaults (W-step by Cholesky "
          "factors of H̃ + ρI, one per penalty value, included in its time: nothing is shared between layers here); "
          "`of which ADMM s`: preconditioning, grid fit and the ADMM iterations; `of which polish s`: the local search "
          "(and the comparison with the initial codes). "
          + ("" if cuda else "On this 2-core CPU only the 4096 x 4096 layer runs: 14336 x 4096 (gate/up, "
             "3.5x the work) and 4096 x 14336 (down_proj, triangular solves with a 14336² factor) are left to the "
             "GPU machine (device tool), which was not lent to this run. ") +
          f"Peak RSS of the benchmark process: {rss:.0f} MiB.", "",
          md_table(rows, ["layer (out x in)", "grid", "device", "GPTQ s", "ADMM-Q s", "ratio", "ADMM iters", "f GPTQ/RTN",
                          "f ADMM-Q/RTN", "of which ADMM s", "of which polish s", "GPU MiB GPTQ", "GPU MiB ADMM-Q", "error"]), "",
          f"Machine: {machine()}"]
    save_section("cost_gpu" if cuda else "cost", "\n".join(md), {"rows": rows, "machine": machine(), "device": where})

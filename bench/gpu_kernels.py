"""GPU kernel speed (issue 11): GEMM time of a written 4-bit sym g128 weight in Marlin (fp16) and torch tinygemm
int4 (bf16) against the fp16 `torch.matmul` of the same layer, batch 1 / 16 / 256, on LLM-sized shapes and on
Gemma-3-270M's linear shapes. Weights are RTN-quantized with our MarlinGrid (the grid Marlin files hold); the
kernels are the ones `admmq-export check --gpu` verifies bit for bit (kernels_check/gpu_marlin.py, gpu_torch.py).
Without CUDA the section says so and records nothing else."""
from __future__ import annotations

import torch

from .common import machine, md_table, save_section

LLM = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out N, in K): q/o-like, up/gate, down
GEMMA_270M = [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)]  # q, k/v, o, gate/up, down
BATCHES = (1, 16, 256)


def _time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000.0  # µs


def _layer(N: int, K: int, iters: int) -> list[dict]:
    from admmq_export.grids import int_grid
    from converters.gptq_pack import pack_rows
    from kernels_check import gpu_marlin
    from kernels_check.gpu import IntTensor

    grid = int_grid("marlin", 4, 128, True)
    W = torch.randn(N, K) * 0.02
    codes, params = grid.quantize_rtn(W)
    Wd = grid.dequant(codes, params).cuda()  # fp16
    t = IntTensor("w", 4, codes, params["scale"][..., 0], params["zero"][..., 0], (torch.arange(K) // 128).int(), 128, False)
    dev = "cuda"
    rows = []
    marlin = None
    if not gpu_marlin.ready("fp16"):
        ops = gpu_marlin._ops("fp16")
        mq = ops.gptq_marlin_repack(torch.from_numpy(pack_rows(codes.T.numpy(), 4)).to(dev), torch.empty(0, dtype=torch.int, device=dev), K, N, 4)
        ms = gpu_marlin.permute_scales(t.scales.T.contiguous().to(dev), K, N, 128)
        ws = torch.zeros(max(torch.cuda.get_device_properties(0).multi_processor_count, 128), dtype=torch.int, device=dev)
        e = torch.empty(0, dtype=torch.int, device=dev)
        tid = gpu_marlin._scalar_types().uint4b8.id
        marlin = (ops, mq, ms, ws, e, tid)
    q = codes.int()
    s = t.scales.to(torch.bfloat16)
    B = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev), 2)
    sz = torch.stack([s, torch.zeros_like(s)], -1).transpose(0, 1).contiguous().to(dev)
    for M in BATCHES:
        a16 = torch.randn(M, K, dtype=torch.float16, device=dev)
        abf = a16.bfloat16()
        r = {"shape": f"{N}x{K}", "batch": M, "fp16_matmul_us": _time(lambda: a16 @ Wd.t(), iters)}
        r["int4_tinygemm_us"] = _time(lambda: torch.ops.aten._weight_int4pack_mm(abf, B, 128, sz), iters)
        if marlin:
            ops, mq, ms, ws, e, tid = marlin
            r["marlin_fp16_us"] = _time(lambda: ops.gptq_marlin_gemm_fp16(a16, None, mq, None, ms, None, None, e, e, ws, tid,
                                                                         M, N, K, True, False, True, False), iters)
            r["marlin_speedup"] = r["fp16_matmul_us"] / r["marlin_fp16_us"]
        r["tinygemm_speedup"] = r["fp16_matmul_us"] / r["int4_tinygemm_us"]
        rows.append(r)
    return rows


def run(quick: bool = False) -> None:
    title = f"## GPU kernel speed (`python -m bench --suite gpu_kernels{' --quick' if quick else ''}`)"
    info = machine()
    if not torch.cuda.is_available():
        save_section("gpu_kernels", "\n".join([title, "", "No GPU was available in this run (torch "
                     f"{torch.__version__}, no CUDA device), so no kernel timings were recorded. Run this suite on a "
                     "CUDA host after `make gpu-stage` (Marlin needs the staged GPTQModel sources)."]),
                     {"machine": info, "cuda": False})
        return
    from kernels_check import gpu_marlin

    iters = 20 if quick else 100
    rows = []
    for model, shapes in (("LLM", LLM[:1] if quick else LLM), ("gemma3-270m", GEMMA_270M)):
        for N, K in shapes:
            rows += [{"model": model, **r} for r in _layer(N, K, iters)]
    info.update({"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                 "marlin": gpu_marlin.ready("fp16") or "built"})
    cols = ["model", "shape", "batch", "fp16_matmul_us", "marlin_fp16_us", "int4_tinygemm_us", "marlin_speedup", "tinygemm_speedup"]
    md = [title, "", f"{info['device']}, CUDA {info['cuda']}, torch {info['torch']}. Mean µs per GEMM over {iters} calls "
          "(CUDA events, after a warm-up call); weights W4 g128 sym (our MarlinGrid, RTN); activations fp16 (Marlin, "
          "matmul) or bf16 (tinygemm). speedup = fp16 matmul time / kernel time. Marlin: "
          f"{info['marlin']}.", "", md_table(rows, cols)]
    save_section("gpu_kernels", "\n".join(md), {"machine": info, "rows": rows})

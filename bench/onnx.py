"""ONNX benchmark (issue 6): SmolLM2-135M file size and ONNX Runtime CPU speed (prefill, decode with the KV cache)
for the fp32 graph, W4 QDQ and W4 MatMulNBits; perplexity through ORT comes from the quality suite (its files
are ONNX, evaluated in ORT) and from the RTN rows here."""
from __future__ import annotations

import os
import time

import torch

from .common import OUT, WIKI, evaluate, export, machine, md_table, save_section

MODEL = "smollm2"


def _fp32(path) -> None:
    import onnx

    from admmq_export.models import load_model
    from converters.onnx_graph import export_fp32

    if path.is_file():
        return
    mp = export_fp32(load_model(MODEL).model)
    onnx.save(mp, str(path))


def speed(path, prefill: int, decode: int, accuracy_level: int = 1, repeats: int = 3) -> dict:
    from converters.onnx import OrtLM

    lm = OrtLM(path, threads=2, accuracy_level=accuracy_level)
    ids = (torch.arange(prefill) * 7 % 1000 + 10).unsqueeze(0)
    best_p = best_d = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        logits, past = lm.step(ids)
        best_p = min(best_p, time.perf_counter() - t)
        nxt = logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        n = ids.shape[1]
        for _ in range(decode):
            logits, past = lm.step(nxt, past, attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                                   position_ids=torch.tensor([[n]]))
            nxt = logits[:, -1:].argmax(-1)
            n += 1
        best_d = min(best_d, time.perf_counter() - t)
    return {"prefill tok/s": prefill / best_p, "decode tok/s": decode / best_d}


def _rest(below: float = 0.5, limit_s: float = 1800) -> None:
    """Wait (at most limit_s) until the 1-minute load average is below `below`, so that timings are not shared."""
    t = time.time()
    while os.getloadavg()[0] > below and time.time() - t < limit_s:
        time.sleep(10)


def run(quick: bool = False) -> None:
    d = OUT / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    wl = 8 if quick else 16
    prefill, decode = (64, 16) if quick else (256, 64)
    fp32 = d / "smollm2-fp32.onnx"
    _fp32(fp32)
    rows = [{"file": "fp32 (original weights)", "MiB": fp32.stat().st_size / 2**20, "wiki ppl (ORT)": None}]
    timed = [(rows[0], fp32, 1)]  # (row, file, accuracy_level): timed together at the end, on a machine at rest
    for label, to, bits, group, sym in [("W4 g32 asym QDQ", "onnx", 4, 32, False), ("W4 g32 sym QDQ", "onnx", 4, 32, True),
                                        ("W4 g32 asym MatMulNBits", "onnx:matmulnbits", 4, 32, False),
                                        ("W4 g32 sym MatMulNBits", "onnx:matmulnbits", 4, 32, True)]:
        out = d / f"smollm2-rtn-{to.replace(':', '-')}-w{bits}g{group}{'s' if sym else 'a'}.onnx"
        rep = export(MODEL, to, out, "--method", "rtn", "--bits", str(bits), "--group-size", str(group),
                     "--sym" if sym else "--asym")
        row = {"file": f"RTN {label}", "MiB": out.stat().st_size / 2**20,
               "wiki ppl (ORT)": evaluate(str(out), WIKI, "llamacpp", wl)["ppl"],
               "wiki ppl (IR)": evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"], "export s": rep["wall_seconds"]}
        rows.append(row)
        timed.append((row, out, 1))
        if "MatMulNBits" in label:
            rows.append({"file": f"RTN {label}, accuracy_level 4 (int8 activations, not bit-exact)", "MiB": row["MiB"]})
            timed.append((rows[-1], out, 4))
    # the calibrated methods at W4 g64 asym and W4 g32 asym (RTN at g32 is in the rows above)
    calibrated = [(64, False, "rtn"), (64, False, "gptq"), (64, False, "admmq"), (32, False, "gptq"), (32, False, "admmq")]
    for group, sym, method in ([] if quick else calibrated):
        g = f"w4g{group}{'s' if sym else 'a'}"
        out = d / f"smollm2-{method}-onnx-{g}.onnx"
        rep = export(MODEL, "onnx", out, "--method", method, "--bits", "4", "--group-size", str(group),
                     "--sym" if sym else "--asym", "--nsamples", "8", "--seqlen", "512")
        rows.append({"file": f"{method.upper()} W4 g{group} {'sym' if sym else 'asym'} QDQ", "MiB": out.stat().st_size / 2**20,
                     "wiki ppl (ORT)": evaluate(str(out), WIKI, "llamacpp", wl)["ppl"],
                     "wiki ppl (IR)": evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"], "export s": rep["wall_seconds"]})
    print("onnx: timing (waiting for the machine to rest)", flush=True)
    _rest()
    for row, path, level in timed:
        row["load"] = os.getloadavg()[0]  # 1-minute load average just before timing: ~0 on a machine at rest
        row.update(speed(path, prefill, decode, accuracy_level=level))
    md = [f"## ONNX: size and ONNX Runtime speed (`python -m bench --suite onnx{' --quick' if quick else ''}`)", "",
          f"SmolLM2-135M. ORT {machine().get('onnxruntime')} CPU, 2 threads; prefill of {prefill} tokens and {decode} decode "
          "steps with the KV cache, best of 3, all timed one after the other after the exports and evaluations (`load`: "
          "the 1-minute load average just before each timing). The quantized files run at `accuracy_level` 1 (fp32 activations, the "
          "arithmetic the file describes, and what our bit-exact check and perplexities use); level 4 is ORT's int8 "
          f"fast path. Perplexity: first {wl} WikiText-2 chunks of 512 (llama.cpp protocol) through ORT and through our "
          "fake-quant IR. Tied embeddings: the output head reads the embedding through a Transpose, no second copy. "
          "SmolLM2's weights come from a Q4_1 file (g32, fp16 scale and fp16 min), which the integer-zero-point "
          "W4 g32 asym grid here does not contain, so RTN is not lossless there (original: 29.72 on these chunks, the "
          "gguf section's f32 row). The RTN/GPTQ/ADMM-Q comparison at 4 bits is at W4 g64 asym and W4 g32 asym (8 x 512 C4 "
          "calibration tokens); W3 and W2 ONNX files "
          "of all three methods, with their ORT perplexities, are in the quality section.", "",
          md_table(rows, ["file", "MiB", "prefill tok/s", "decode tok/s", "load", "wiki ppl (ORT)", "wiki ppl (IR)", "export s"]), "",
          f"Machine: {machine()}"]
    save_section("onnx", "\n".join(md), {"rows": rows, "machine": machine()})

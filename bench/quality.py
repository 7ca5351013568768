"""Quality table (issues 3, 6 and 10): same grid per row — RTN, GPTQ, ADMM-Q (ours) and AutoRound — WikiText-2
and C4 perplexity and KLD vs the original. Ours are written as ONNX (QDQ, fp32 scales: the integer grid,
dequantized exactly) and measured in ONNX Runtime, beside our fake-quant IR; AutoRound is exported with its own
GPTQ exporter and measured through our GPTQ checkpoint loader. Plus a ppl-vs-bits plot."""
from __future__ import annotations

import os
import re
import time

from .common import (C4_VAL, CALIB_NSAMPLES, OUT, RESULTS, WIKI, evaluate, export, machine, mark_kept, md_table, ppl_plot,
                     recorded, run_knobs, save_section)
from . import quality_stories as qs
from .autoround_peer import autoround

MODEL = "smollm2"
GRIDS = [(3, 64, False), (3, 64, True), (2, 32, False)]  # the issue-3 targets (W4: the gptq/gguf/onnx sections)
AUTOROUND_GRIDS = {(3, 64, False)}
METHODS = ["rtn", "gptq", "admmq"]


def _evals(target: str, wl: int, wc: int, reference: str | None) -> dict:
    w = evaluate(target, WIKI, "llamacpp", wl, reference=reference)
    c = evaluate(target, C4_VAL, "llamacpp", wc)
    return {"wiki": w["ppl"], "c4": c["ppl"], "kld": w.get("kld")}


def run(quick: bool = False) -> None:
    wl, wc = (8, 4) if quick else (16, 4)
    # BENCH_NSAMPLES (default 128) x 512; 128 x 512 costs ~20 min of calibration passes per export on 2 cores
    nsamples, seqlen = (8, 256) if quick else (CALIB_NSAMPLES, 512)
    ar_iters = 20 if quick else 50
    grids = GRIDS[2:] if quick else GRIDS
    kept = []
    only = os.environ.get("BENCH_QUALITY_ONLY")  # e.g. "W3 g64 sym": rerun these grids, keep the other recorded rows
    if only and not quick:
        grids = [g for g in grids if _gname(*g) in only.split(",")]
        kept = _kept_rows({_gname(*g) for g in grids})
    calib = ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    base = _evals(MODEL, wl, wc, None)
    rows = [{"grid": "-", "method": "original", "wiki_file": base["wiki"], "c4_file": base["c4"]}]
    t0 = time.time()
    for bits, group, sym in grids:
        gname = _gname(bits, group, sym)
        for method in METHODS:
            out = OUT / "quality" / f"smollm2-{method}-w{bits}g{group}{'s' if sym else 'a'}.onnx"
            rep = export(MODEL, "onnx", out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                         "--sym" if sym else "--asym", *calib)
            f = _evals(str(out), wl, wc, MODEL)
            ir = {"wiki": evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"]}
            rows.append({"grid": gname, "method": method, "calib": f"{nsamples} x {seqlen}", "wiki_file": f["wiki"], "wiki_ir": ir["wiki"], "c4_file": f["c4"],
                         "kld": f["kld"], "quant_s": sum(s["seconds"] for s in rep["stats"].values()),
                         "s/tensor": sum(s["seconds"] for s in rep["stats"].values()) / len(rep["stats"]),
                         "export_s": rep["wall_seconds"], "peak_rss_mib": rep["report"]["peak_rss_mib"]})
        if (bits, group, sym) not in AUTOROUND_GRIDS or quick:
            continue
        out = OUT / "quality" / f"smollm2-autoround-w{bits}g{group}{'s' if sym else 'a'}"
        ar = autoround(MODEL, out, "auto_gptq", nsamples, seqlen, ar_iters, bits, group, sym)
        if "error" in ar:
            rows.append({"grid": gname, "method": f"autoround (not measured: {ar['error']})"})
        else:
            f = _evals(str(out), wl, wc, MODEL)
            rows.append({"grid": gname, "method": f"autoround iters={ar_iters}", "calib": f"{nsamples} x {seqlen}", "wiki_file": f["wiki"], "c4_file": f["c4"],
                         "kld": f["kld"], "quant_s": ar["seconds"], "peak_rss_mib": ar["peak_rss_mib"]})
    srows = [] if quick else qs.run(_gname)[0]
    rows += kept
    rows.sort(key=lambda r: [_gname(*g) for g in GRIDS].index(r["grid"]) if r["grid"] != "-" else -1)
    targets = []
    for gname in dict.fromkeys(r["grid"] for r in rows if r["grid"] != "-"):
        g = next(r for r in rows if r["grid"] == gname and r["method"] == "gptq")
        a = next(r for r in rows if r["grid"] == gname and r["method"] == "admmq")
        removed = 1 - (a["wiki_file"] - base["wiki"]) / (g["wiki_file"] - base["wiki"])
        targets.append({"grid": gname, "calib": g.get("calib"), "gptq": g["wiki_file"], "admmq": a["wiki_file"], "share_of_gptq_excess_removed": removed,
                        "time_ratio_admmq/gptq": a["quant_s"] / g["quant_s"], "target_met(≥0.4)": removed >= 0.4})
    _plot(rows)
    env = "" if quick else run_knobs("BENCH_NSAMPLES", "BENCH_QUALITY_ONLY", "BENCH_REUSE")
    md = [f"## Quality: RTN / GPTQ / ADMM-Q / AutoRound on the same grids (`{env}python -m bench --suite quality{' --quick' if quick else ''}`)", "",
          f"SmolLM2-135M, calibration {nsamples} x {seqlen} C4 tokens (seed 0; the same windows for AutoRound). Perplexity on "
          f"the first {wl} WikiText-2 and {wc} C4-validation chunks of 512 tokens (llama.cpp protocol). `_file`: our ONNX "
          "file run in ONNX Runtime (AutoRound: its GPTQ checkpoint through our loader); `_ir`: our fake-quant IR (fp32 "
          "torch) — the ONNX weights are bit-identical to it, so the two differ only by ORT's fp32 arithmetic. KLD vs "
          "the original on the WikiText-2 windows. The sequential pipeline is the same for every method (true-sequential, "
          "Hessians from the already-quantized previous layers). AutoRound runs on CPU with "
          f"iters={ar_iters}, batch 4 (its default 200 iters x 128 samples does not fit this 2-core machine's budget) "
          "and is exported with its own `auto_gptq` exporter.", "",
          *_kept_note(kept),
          md_table(rows, ["grid", "method", "calib", "wiki_file", "wiki_ir", "c4_file", "kld", "quant_s", "s/tensor", "export_s",
                         "peak_rss_mib"]), "",
          "`quant_s`: the quantizer's own time summed over the 210 quantized tensors (`s/tensor` its mean); `export_s`: the "
          "whole export (model load, calibration forward passes, quantizer, ONNX writing); `peak_rss_mib`: the export "
          "process's peak resident memory.", "",
          "Issue 3 target: ADMM-Q removes ≥ 40% of GPTQ's perplexity excess over the original (same grid, same calibration).", "",
          md_table(targets, ["grid", "calib", "gptq", "admmq", "share_of_gptq_excess_removed", "time_ratio_admmq/gptq", "target_met(≥0.4)"]),
          "", "![ppl vs bits](bench/plots/quality_ppl_bits.png)", "", *_stories_md(srows), f"Total {time.time() - t0:.0f} s. Machine: {machine()}"]
    save_section("quality", "\n".join(md), {"rows": rows, "targets": targets, "stories260k": srows, "machine": machine()})


def _stories_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return ["### stories260K", "", qs.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), "",
            md_table(rows, ["grid", "method", "calib", "ppl_file", "ppl_ir", "kld", "quant_s"]), "",
            f"`ppl_file`: the ONNX file in ONNX Runtime; `ppl_ir`: our fake-quant IR; {qs.WINDOWS} TinyStories windows of "
            f"{qs.SEQLEN} tokens. Fallbacks, per grid (the same for every method): {_fallbacks_by_grid(rows)}.", "",
            qs.plot(rows, _bpw), ""]


def _fallbacks_by_grid(rows: list[dict]) -> str:
    """Each grid's fallback report once ('W3 g32 asym: 5 tensors ...'), in row order."""
    seen: dict[str, str] = {}
    for r in rows:
        if r.get("fallback") and r["fallback"] != "-":
            seen.setdefault(r["grid"], r["fallback"])
    return "; ".join(f"{g}: {fb}" for g, fb in seen.items()) or "none"


def _gname(bits: int, group: int, sym: bool) -> str:
    return f"W{bits} g{group} {'sym' if sym else 'asym'}"


def _kept_rows(rerun: set[str]) -> list[dict]:
    """The recorded rows of the grids not rerun, marked with their calibration and machine (BENCH_QUALITY_ONLY)."""
    prev = recorded("quality")
    md = RESULTS / "quality.md"
    m = re.search(r"calibration (\d+ x \d+)", md.read_text()) if prev and md.is_file() else None  # rows before `calib`
    return mark_kept([{"calib": m.group(1) if m else "?", **r} for r in prev.get("rows", [])
                      if r["grid"] != "-" and r["grid"] not in rerun], prev)


def _kept_note(kept: list[dict]) -> list[str]:
    if not kept:
        return []
    grids = ", ".join(dict.fromkeys(r["grid"] for r in kept))
    cpus = ", ".join(sorted({r["machine_cpu"] for r in kept}))
    return [f"Rows of {grids} are kept from an earlier run of this suite (column `calib`; machine "
            f"{cpus}; `BENCH_QUALITY_ONLY` reran the others); the original model's row is re-measured.", ""]


def _bpw(grid: str) -> float:
    """'W3 g64 asym' -> codes + an fp16 scale and a zero point per group."""
    bits, group = (int(x[1:]) for x in grid.split()[:2])
    return bits + 32 / group


def _plot(rows) -> None:
    series = {m: [(_bpw(r["grid"]), r["wiki_file"]) for r in rows if r["method"].startswith(m) and r.get("wiki_file")]
              for m in ("rtn", "gptq", "admmq", "autoround")}
    ppl_plot("quality_ppl_bits.png", series, rows[0]["wiki_file"], "original",
             "bits per weight (codes + group parameters)", "WikiText-2 perplexity", "SmolLM2-135M: perplexity vs bits")

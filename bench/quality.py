"""Quality table (issues 3, 6 and 10): same grid per row — RTN, GPTQ, ADMM-Q (ours) and AutoRound — WikiText-2
and C4 perplexity and KLD vs the original. Ours are written as ONNX (QDQ, fp32 scales: the integer grid,
dequantized exactly) and measured in ONNX Runtime, beside our fake-quant IR; AutoRound is exported with its own
GPTQ exporter and measured through our GPTQ checkpoint loader. Plus a ppl-vs-bits plot."""
from __future__ import annotations

import os
import re
import time

from .common import (C4_VAL, CALIB_NSAMPLES, OUT, RESULTS, WIKI, calib_label, evaluate, export, machine, mark_kept,
                     md_table, ppl_plot, recorded, run_knobs, save_section)
from . import quality_stories as qs
from .autoround_peer import autoround

F, T = False, True
# (model, grids): W4/W3/W2 asym at every group its linears' in-dims divide (SmolLM2: 576 and 1536, so 32 and 64;
# Gemma-3-270M: 640, 1024 and 2048, so 32, 64 and 128), plus W3 g64 sym on SmolLM2 (an issue-3 target)
MODELS = {"smollm2": [(4, 64, F), (4, 32, F), (3, 64, F), (3, 64, T), (3, 32, F), (2, 64, F), (2, 32, F)],
          "gemma3-270m": [(4, 128, F), (4, 64, F), (4, 32, F), (3, 128, F), (3, 64, F), (3, 32, F), (2, 128, F),
                          (2, 64, F), (2, 32, F)]}
METHODS = ["rtn", "gptq", "admmq", "autoround"]  # AutoRound: 11-13 min of CPU per grid at iters=50, 32 windows, 2 cores
TITLES = {"smollm2": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
PLOTS = {"smollm2": "quality_ppl_bits.png", "gemma3-270m": "quality_ppl_bits_gemma3.png"}


def _evals(target: str, wl: int, wc: int, reference: str | None) -> dict:
    w = evaluate(target, WIKI, "llamacpp", wl, reference=reference)
    c = evaluate(target, C4_VAL, "llamacpp", wc)
    return {"wiki": w["ppl"], "c4": c["ppl"], "kld": w.get("kld")}


def _picked(method: str) -> bool:
    """BENCH_QUALITY_METHODS=rtn,gptq,admmq runs only these methods (the grids' other rows are kept); unset: all."""
    pick = os.environ.get("BENCH_QUALITY_METHODS")
    return not pick or method in pick.split(",")


def _selection(quick: bool) -> list[tuple[str, tuple]]:
    """(model, grid) to run: BENCH_QUALITY_ONLY="W3 g64 sym,gemma3-270m:W4 g128 asym" (no model: SmolLM2; the entry
    `stories260k` reruns that table), else all."""
    if quick:
        return [("smollm2", (2, 32, False))]
    only = os.environ.get("BENCH_QUALITY_ONLY")
    want = {(x.split(":")[0] if ":" in x else "smollm2", x.split(":")[-1].strip()) for x in only.split(",")} if only else None
    return [(m, g) for m, grids in MODELS.items() for g in grids if want is None or (m, _gname(*g)) in want]


def _row(model: str, method: str, gname: str, calib: str, f: dict, **more) -> dict:
    return {"model": model, "grid": gname, "method": method, "calib": calib, "wiki_file": f["wiki"],
            "c4_file": f["c4"], "kld": f["kld"], **more}


def _grid_rows(model, bits, group, sym, wl, wc, nsamples, seqlen, ar_iters, methods) -> list[dict]:
    gname, tag = _gname(bits, group, sym), f"w{bits}g{group}{'s' if sym else 'a'}"
    calib = ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    rows = []
    for method in [m for m in methods if m != "autoround"]:
        out = OUT / "quality" / f"{model}-{method}-{tag}.onnx"
        rep = export(model, "onnx", out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                     "--sym" if sym else "--asym", *calib)
        quant_s = sum(s["seconds"] for s in rep["stats"].values())
        rows.append(_row(model, method, gname, calib_label(nsamples, seqlen, rep["calibration"]["bos"]),
                         _evals(str(out), wl, wc, model),
                         wiki_ir=evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"], quant_s=quant_s,
                         **{"s/tensor": quant_s / len(rep["stats"]), "export_s": rep["wall_seconds"],
                            "peak_rss_mib": rep["report"]["peak_rss_mib"]}))
    if "autoround" in methods:
        out = OUT / "quality" / f"{model}-autoround-{tag}"
        ar = autoround(model, out, "auto_gptq", nsamples, seqlen, ar_iters, bits, group, sym)
        if "error" in ar:
            rows.append({"model": model, "grid": gname, "method": f"autoround (not measured: {ar['error']})"})
        else:
            rows.append(_row(model, f"autoround iters={ar_iters}", gname, calib_label(nsamples, seqlen, ar["calib_bos"]),
                             _evals(str(out), wl, wc, model), quant_s=ar["seconds"], peak_rss_mib=ar["peak_rss_mib"]))
    return rows


def run(quick: bool = False) -> None:
    """Every selected (model, grid) in turn; the section is rewritten after each, so a run cut short keeps what it
    finished (and the recorded rows it did not rerun)."""
    wl, wc = (8, 4) if quick else (16, 4)
    nsamples, seqlen = (8, 256) if quick else (CALIB_NSAMPLES, 512)  # BENCH_NSAMPLES (default 128) x 512
    ar_iters = 20 if quick else 50
    sel = _selection(quick)
    methods = [m for m in METHODS if _picked(m) and not (quick and m == "autoround")]
    t0 = time.time()
    prev = [] if quick else _kept_rows()
    srows = [] if quick else recorded("quality").get("stories260k", [])
    # every model's original row is re-measured
    orig = [{"model": m, "grid": "-", "method": "original", **{f"{k}_file": v for k, v in _evals(m, wl, wc, None).items()
                                                               if k != "kld"}}
            for m in dict.fromkeys([m for m, _ in sel] + [r["model"] for r in prev])]
    rows = []
    for model, (bits, group, sym) in sel:
        rows += _grid_rows(model, bits, group, sym, wl, wc, nsamples, seqlen, ar_iters, methods)
        _save(orig, rows, prev, srows, quick, wl, wc, ar_iters, time.time() - t0)
    only = os.environ.get("BENCH_QUALITY_ONLY")
    if not quick and (not only or "stories260k" in only.split(",")):  # the stories260K table: all of it, or kept
        srows = qs.run(_gname)[0]
    _save(orig, rows, prev, srows, quick, wl, wc, ar_iters, time.time() - t0)


def _save(orig, rows, prev, srows, quick, wl, wc, ar_iters, total_s, env=None, mach=None) -> None:
    mach = mach or machine()
    fresh = {_key(r) for r in rows}  # a recorded row is replaced only by a new row of its (model, grid, method)
    kept = [r for r in prev if _key(r) not in fresh]
    rows = sorted(orig + rows + kept, key=_order)
    targets = _targets(rows)
    plots = [_plot(rows, m) if any(r["model"] == m and r["grid"] != "-" for r in rows) else None for m in MODELS]
    if env is None:
        env = "" if quick else run_knobs("BENCH_NSAMPLES", "BENCH_QUALITY_ONLY", "BENCH_QUALITY_METHODS", "BENCH_REUSE")
    md = [f"## Quality: RTN / GPTQ / ADMM-Q / AutoRound on the same grids (`{env}python -m bench --suite quality{' --quick' if quick else ''}`)", "",
          "SmolLM2-135M and Gemma-3-270M, calibration C4 windows (seed 0; the same windows for AutoRound; `calib` = "
          "samples x tokens, ', BOS': the first token of every window replaced by BOS, as llama.cpp runs the model, "
          "for a tokenizer that adds BOS: Gemma-3; SmolLM2's adds none). "
          f"Perplexity on the first {wl} WikiText-2 and {wc} C4-validation chunks of 512 tokens "
          "(llama.cpp protocol). `_file`: our ONNX file run in ONNX Runtime (AutoRound: its GPTQ checkpoint through our "
          "loader); `_ir`: our fake-quant IR (fp32 torch) — the ONNX weights are bit-identical to it, so the two differ "
          "only by ORT's fp32 arithmetic. KLD vs the original on the WikiText-2 windows. The sequential pipeline is the "
          "same for every method (true-sequential, Hessians from the already-quantized previous layers). Grids: W4, W3 "
          "and W2 at every group size the model's linear in-dims divide (SmolLM2: 576 and 1536, so 32 and 64; Gemma-3: "
          "32, 64 and 128). AutoRound runs on CPU with "
          f"iters={ar_iters}, batch 4 (its default 200 iters x 128 samples does not fit this 2-core machine's budget) "
          "and is exported with its own `auto_gptq` exporter.", "",
          *_kept_note(kept), *_missing_note(rows),
          md_table(rows, ["model", "grid", "method", "calib", "wiki_file", "wiki_ir", "c4_file", "kld", "quant_s",
                          "s/tensor", "export_s", "peak_rss_mib"]), "",
          "`quant_s`: the quantizer's own time summed over the quantized tensors (`s/tensor` its mean); `export_s`: the "
          "whole export (model load, calibration forward passes, quantizer, ONNX writing); `peak_rss_mib`: the export "
          "process's peak resident memory.", "",
          "Issue 3 target: ADMM-Q removes ≥ 40% of GPTQ's perplexity excess over the original (same grid, same calibration).", "",
          md_table(targets, ["model", "grid", "calib", "gptq", "admmq", "share_of_gptq_excess_removed",
                             "time_ratio_admmq/gptq", "target_met(≥0.4)"]),
          "", *[f"![{m} ppl vs bits](bench/plots/{p})" for m, p in zip(MODELS, plots) if p], "", *_stories_md(srows),
          f"Total {total_s:.0f} s. Machine: {mach}"]
    save_section("quality", "\n".join(md), {"rows": rows, "targets": targets, "stories260k": srows, "machine": mach,
                                            "total_s": total_s, "knobs": env})


def rerender() -> None:
    """Rewrite the section from its recorded JSON (after a change to the text or layout; nothing is re-measured)."""
    d = recorded("quality")
    md = (RESULTS / "quality.md").read_text()
    total = d.get("total_s") or float(re.search(r"Total (\d+) s", md).group(1))
    env = d.get("knobs", re.search(r"\(`(.*?)python -m bench --suite quality`\)", md).group(1))
    calib = re.search(r"calibration (\d+ x \d+)", md)
    rows = [{"model": "smollm2", **({"calib": calib.group(1)} if calib and r["grid"] != "-" else {}), **r}
            for r in d["rows"]]
    # the last run's own rows carry no machine mark; the rows it kept do
    orig = [r for r in rows if r["grid"] == "-"]
    new = [r for r in rows if r["grid"] != "-" and "machine_cpu" not in r]
    kept = [r for r in rows if r["grid"] != "-" and "machine_cpu" in r]
    _save(orig, new, kept, d.get("stories260k", []), False, 16, 4, 50, total, env, d.get("machine"))


def _key(r: dict) -> tuple:
    return r.get("model", "smollm2"), r["grid"], r["method"].split()[0]


def _order(r: dict):
    """Rows by model, then grid in MODELS order (the original first), then method."""
    m = r.get("model", "smollm2")
    grids = [_gname(*g) for g in MODELS.get(m, [])]
    return (list(MODELS).index(m) if m in MODELS else 99, grids.index(r["grid"]) if r["grid"] in grids else -1,
            ["original", *METHODS].index(r["method"].split()[0]) if r["method"].split()[0] in ["original", *METHODS] else 9)


def _targets(rows: list[dict]) -> list[dict]:
    base = {r["model"]: r["wiki_file"] for r in rows if r["method"] == "original"}
    out = []
    for m, gname in dict.fromkeys((r["model"], r["grid"]) for r in rows if r["grid"] != "-"):
        g = next((r for r in rows if (r["model"], r["grid"], r["method"]) == (m, gname, "gptq")), None)
        a = next((r for r in rows if (r["model"], r["grid"], r["method"]) == (m, gname, "admmq")), None)
        if g is None or a is None or m not in base:
            continue
        removed = 1 - (a["wiki_file"] - base[m]) / (g["wiki_file"] - base[m])
        out.append({"model": m, "grid": gname, "calib": g.get("calib"), "gptq": g["wiki_file"], "admmq": a["wiki_file"],
                    "share_of_gptq_excess_removed": removed, "time_ratio_admmq/gptq": a["quant_s"] / g["quant_s"],
                    "target_met(≥0.4)": removed >= 0.4})
    return out


def _missing_note(rows: list[dict]) -> list[str]:
    """A sentence naming the (model, grid, method) rows of MODELS x METHODS not measured yet ([] if none)."""
    have = {_key(r) for r in rows}
    miss = {f"{m} {_gname(*g)}": [meth for meth in METHODS if (m, _gname(*g), meth) not in have]
            for m, grids in MODELS.items() for g in grids}
    miss = {k: v for k, v in miss.items() if v}
    return [] if not miss else [f"Not measured yet (CPU budget; `BENCH_QUALITY_ONLY` / `BENCH_QUALITY_METHODS` run them "
                                f"a few at a time): {'; '.join(f'{k} ({chr(44).join(v)})' for k, v in miss.items())}.", ""]


def _stories_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return ["### stories260K", "", qs.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), "",
            md_table(rows, ["grid", "method", "calib", "ppl_file", "ppl_ir", "kld", "quant_s", "same_ir"]), "",
            f"`ppl_file`: the ONNX file in ONNX Runtime; `ppl_ir`: our fake-quant IR; {qs.WINDOWS} TinyStories windows of "
            f"{qs.SEQLEN} tokens. Fallbacks, per grid (the same for RTN, GPTQ and ADMM-Q): {_fallbacks_by_grid(rows)}.",
            *_ar_skipped_note(rows), "",
            qs.plot(rows, _bpw), ""]


def _fallbacks_by_grid(rows: list[dict]) -> str:
    """Each grid's fallback report once ('W3 g32 asym: 5 tensors ...'), in row order."""
    seen: dict[str, str] = {}
    for r in rows:
        if r.get("fallback") and r["fallback"] != "-":
            seen.setdefault(r["grid"], r["fallback"])
    return "; ".join(f"{g}: {fb}" for g, fb in seen.items()) or "none"


def _ar_skipped_note(rows: list[dict]) -> list[str]:
    """AutoRound's unquantized linears per grid, from its checkpoints ([] if it has no rows)."""
    ar = [f"{r['grid']}: {r['skipped']}" for r in rows if r.get("skipped")]
    return [f"Left unquantized (fp32) by AutoRound, per grid: {'; '.join(ar)}."] if ar else []


def _gname(bits: int, group: int, sym: bool) -> str:
    return f"W{bits} g{group} {'sym' if sym else 'asym'}"


def _kept_rows() -> list[dict]:
    """Every recorded row but the originals', marked with its calibration and machine (rows before `model`: SmolLM2)."""
    prev = recorded("quality")
    md = RESULTS / "quality.md"
    m = re.search(r"calibration (\d+ x \d+)", md.read_text()) if prev and md.is_file() else None  # rows before `calib`
    return mark_kept([{"model": "smollm2", "calib": m.group(1) if m else "?", **r} for r in prev.get("rows", [])
                      if r["grid"] != "-"], prev)


def _kept_note(kept: list[dict]) -> list[str]:
    if not kept:
        return []
    grids = ", ".join(dict.fromkeys(f"{r['model']} {r['grid']}" for r in kept))
    cpus = ", ".join(sorted({r["machine_cpu"] for r in kept}))
    return [f"Rows of {grids} are kept from earlier runs of this suite (column `calib`; machine {cpus}; "
            "`BENCH_QUALITY_ONLY` / `BENCH_QUALITY_METHODS` reran the others); the original models' rows are "
            "re-measured. Rows of different runs are not reruns of each other to the bit: GPTQ's and ADMM-Q's codes "
            "follow the host's float summation order (README, Reproducibility; the stories260K section measures it), "
            "and hosts differ in speed, so compare times within a run: each grid's GPTQ and ADMM-Q rows, whose times "
            "give the time ratio below, come from one host.", ""]


def _bpw(grid: str) -> float:
    """'W3 g64 asym' -> codes + an fp16 scale and a zero point per group."""
    bits, group = (int(x[1:]) for x in grid.split()[:2])
    return bits + 32 / group


def _plot(rows, model: str) -> str:
    rows = [r for r in rows if r["model"] == model]
    series = {m: [(_bpw(r["grid"]), r["wiki_file"]) for r in rows if r["method"].startswith(m) and r.get("wiki_file")
                  and r["grid"].endswith("asym")] for m in METHODS}
    ppl_plot(PLOTS[model], series, next(r["wiki_file"] for r in rows if r["method"] == "original"), "original",
             "bits per weight (codes + group parameters)", "WikiText-2 perplexity",
             f"{TITLES[model]}: perplexity vs bits (asym grids)")
    return PLOTS[model]


if __name__ == "__main__":  # python -m bench.quality --rerender
    import sys

    if sys.argv[1:] != ["--rerender"]:
        sys.exit("usage: python -m bench.quality --rerender   (the suite itself runs with python -m bench --suite quality)")
    rerender()

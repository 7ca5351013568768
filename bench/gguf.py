"""GGUF benchmark (issues 9 and 10): ours (RTN/GPTQ/ADMM-Q on the preset's grids) vs llama.cpp's own
llama-quantize with and without an importance matrix (llama-imatrix on the same calibration text), every
file's perplexity and KL divergence measured BY llama.cpp (llama-perplexity, ctx 512, same chunks)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from .common import (CALIB_NSAMPLES, OUT, WIKI, calib_label, evaluate, export, machine, mark_kept, md_table, ppl_plot,
                     recorded, run_knobs, save_section, shared_data)
from .autoround_peer import autoround
from .llamacpp_tools import binary

# (model, presets): both models at the presets of the issue-9 target and Q4_0
MODELS = [("smollm2", ["q4_k_m", "q3_k_m", "q2_k", "q4_0"]), ("gemma3-270m", ["q4_k_m", "q3_k_m", "q2_k", "q4_0"])]
TARGET_PRESETS = ("q4_k_m", "q3_k_m", "q2_k")
# our methods and their options: ADMM-Q with the diag(H)-weighted clipping search for the grid (the imatrix's role in
# llama.cpp's scale search) and the grid refresh (block scales refitted for the final codes); GPTQ as the reference
# runs it
METHODS = {"rtn": [], "gptq": [], "admmq": ["--clip-search", "--refit"],
           # and then the float fields (fp16 d/dmin) and norms tuned end to end, codes fixed: one pass over the windows
           "admmq+tune": ["--clip-search", "--refit", "--tune-steps", str(CALIB_NSAMPLES), "--tune-lr", "1e-4"],
           # the refitting clipping search (llama.cpp's scale-search idea: each candidate range with its LS scales)
           "admmq+lsclip": ["--clip-search", "--clip-mode", "refit", "--refit"],
           "admmq+lsclip+tune": ["--clip-search", "--clip-mode", "refit", "--refit", "--tune-steps", str(CALIB_NSAMPLES), "--tune-lr", "1e-4"],
           # the same tuning on the calibration text's own next-token cross-entropy (no original model in the loop)
           "admmq+lsclip+tunece": ["--clip-search", "--clip-mode", "refit", "--refit", "--tune-steps", str(CALIB_NSAMPLES),
                                   "--tune-lr", "1e-4", "--tune-loss", "ce"]}
# asymmetric calibration (--asym-calib, GPTAQ-style) beside the plain rows, where the CPU budget allows it (at up to
# 32 calibration samples; a run at more keeps the rows recorded at 32, with their `calib`)
ASYM = {("smollm2", "q3_k_m")} if CALIB_NSAMPLES <= 32 else set()
ASYM_METHODS = {"gptq+asym": ["--asym-calib"], "admmq+asym": ["--clip-search", "--refit", "--asym-calib"]}
# AutoRound's own GGUF export as a peer (issue 10), where the CPU budget allows it
AUTOROUND = {("smollm2", "q4_k_m"), ("smollm2", "q3_k_m"), ("smollm2", "q2_k")}
AUTOROUND_ITERS = 50  # as in the quality suite (its default, 200, is ~4x the CPU time)
# auto-round's scheme name per preset where it is not gguf:<preset> (it has no plain q2_k mix; q2_k_s is the nearest)
AUTOROUND_SCHEME = {"q2_k": "gguf:q2_k_s"}


def _tool(name: str) -> str:
    b = binary(name)
    if b is None:
        raise RuntimeError(f"{name} not built: run `python -m bench.llamacpp_tools build` first")
    return str(b)


def _run(args: list[str], timeout: int = 3600) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {p.stderr[-1500:]}")
    return p.stdout + p.stderr


def perplexity(gguf: Path, chunks: int, kld_base: Path | None = None, save_base: Path | None = None) -> dict:
    args = [_tool("llama-perplexity"), "-m", str(gguf), "-f", shared_data(WIKI), "-c", "512", "--chunks", str(chunks),
            "-t", "2", "-b", "512"]
    if save_base is not None:
        args += ["--kl-divergence-base", str(save_base)]
    if kld_base is not None:
        args = [a for a in args if a not in ("-f", shared_data(WIKI))]
        args += ["--kl-divergence-base", str(kld_base), "--kl-divergence"]
    out = _run(args)
    res = {}
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out) or re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out)
    if m:
        res["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s*([0-9.]+)", out)
    if m:
        res["kld"] = float(m.group(1))
    return res


def calibration_text(model: str, path: Path, nsamples: int, seqlen: int, seed: int = 0) -> Path:
    """Our calibration windows (same seed and token count) as text, for llama-imatrix."""
    from admmq_export.calib import calibration_samples
    from admmq_export.models import load_model

    lm = load_model(model)
    # bos=False: the text of the windows as cut; llama-imatrix puts BOS at the start of each chunk itself
    s = calibration_samples(lm.tokenizer, shared_data("c4-train-00000-first1000.jsonl"), nsamples, seqlen, seed,
                            bos=False)
    path.write_text("\n\n".join(lm.tokenizer.decode(x) for x in s))
    return path


def one_model(model: str, presets: list[str], chunks: int, nsamples: int, seqlen: int):
    """Every row of one model: its f32 GGUF, llama.cpp's files with and without the imatrix, ours per method, and
    AutoRound's own GGUF where it is a peer. Yields (rows, summary) so far after each preset, so a run cut short
    keeps the presets it finished."""
    d = OUT / "gguf" / model
    d.mkdir(parents=True, exist_ok=True)
    calib = ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    f32 = d / "f32.gguf"
    # its report says whether our windows start with BOS; llama-imatrix's chunks do then too (its own BOS rule)
    label = calib_label(nsamples, seqlen, export(model, "gguf:f32", f32, *calib)["calibration"]["bos"])
    base = d / "f32.kld"
    rows = [{"model": model, "file": "f32 (ours, unquantized)", "bpw": 32.0, "calib": label,
             "MiB": f32.stat().st_size / 2**20,
             **perplexity(f32, chunks, save_base=base), "ppl_ir": evaluate(model, WIKI, "llamacpp", chunks)["ppl"]}]
    rows[0]["excess"] = 0.0
    ctext = calibration_text(model, d / "calib.txt", nsamples, seqlen)
    imat = d / "imatrix.dat"
    _run([_tool("llama-imatrix"), "-m", str(f32), "-f", str(ctext), "-o", str(imat), "-c", str(seqlen), "-t", "2",
          "--chunks", str(nsamples)])
    summary = []
    for preset in presets:
        new = []
        for imatrix in (False, True):
            out = d / f"llamacpp-{preset}{'-imat' if imatrix else ''}.gguf"
            ts = time.time()
            _run([_tool("llama-quantize"), *(["--imatrix", str(imat)] if imatrix else []), str(f32), str(out),
                  preset.upper(), "2"])
            new.append({"model": model, "file": f"llama.cpp {preset.upper()}{' + imatrix' if imatrix else ''}",
                        "preset": preset, "seconds": time.time() - ts, "MiB": out.stat().st_size / 2**20,
                        **perplexity(out, chunks, kld_base=base)})
        src = _source_row(model, preset, d / f"llamacpp-{preset}.gguf", chunks, base)
        new += [src] if src else []
        methods = {**METHODS, **(ASYM_METHODS if (model, preset) in ASYM else {})}
        methods = {k: v for k, v in methods.items() if _picked(k)}
        for method, opts in methods.items():
            out = d / f"ours-{method}-{preset}.gguf"
            rep = export(model, f"gguf:{preset}", out, "--method", method.split("+")[0], *opts, *calib)
            new.append({"model": model, "file": f"admmq-export {method.upper()} {preset.upper()}", "preset": preset,
                        "method": method, "options": " ".join(opts), "seconds": rep["wall_seconds"],
                        "MiB": out.stat().st_size / 2**20, **perplexity(out, chunks, kld_base=base),
                        "ppl_ir": evaluate(f"{out}.ir", WIKI, "llamacpp", chunks)["ppl"],
                        "types": rep["report"].get("gguf types"),
                        **({"tune": rep["report"]["tune"]} if "tune" in rep.get("report", {}) else {})})
        if (model, preset) in AUTOROUND and _picked("autoround"):
            new.append(_autoround_row(model, preset, d, chunks, base, nsamples, seqlen))
        for r in new:
            r["excess"] = r["ppl"] - rows[0]["ppl"] if "ppl" in r else None
            r["calib"] = label
        rows += new
        im = next(r for r in new if "imatrix" in r["file"])
        for r in new:
            if r.get("method") and "ppl" in r:
                removed = 1 - r["excess"] / im["excess"] if im["excess"] > 0 else float("nan")
                summary.append({"model": model, "preset": preset.upper(), "method": r["method"],
                                "calib": label, "ppl": r["ppl"], "imatrix_ppl": im["ppl"],
                                "share_of_imatrix_excess_removed": removed,
                                "target_met(≥0.5)": removed >= 0.5 if preset in TARGET_PRESETS else "-"})
        yield rows, summary


def _tensor_types(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _source_row(model: str, preset: str, llamacpp_file: Path, chunks: int, base: Path) -> dict | None:
    """The model's own distributed GGUF, measured like every file, where its tensor types are exactly those of
    llama.cpp's file for this preset (Gemma-3-270M Q4_K_M): the most faithful file of that preset there can be, so
    its excess over f32 is what llama.cpp's activation quantization alone costs. None elsewhere."""
    from admmq_export.models import resolve_model_path

    src = resolve_model_path(model)
    if src.suffix != ".gguf" or _tensor_types(src) != _tensor_types(llamacpp_file):
        return None
    return {"model": model, "file": f"source file ({src.name}, the model as distributed)", "preset": preset,
            "method": "source file", "MiB": src.stat().st_size / 2**20, **perplexity(src, chunks, kld_base=base)}


def _source_note(rows, summary) -> str:
    """A sentence on each `source file` row and its share ('' if none)."""
    out = []
    for r in rows:
        if r.get("method") != "source file" or "ppl" not in r:
            continue
        s = next((x for x in summary if x["method"] == "source file" and x["model"] == r["model"]
                  and x["preset"] == r["preset"].upper()), None)
        share = f", a share of {s['share_of_imatrix_excess_removed']:.2f} against the imatrix file of its run" if s else ""
        out.append(f" `source file` ({r['model']} {r['preset'].upper()}): the model's own GGUF, whose tensor types are "
                   f"exactly the preset's, so no file of that preset can hold the model more faithfully; llama.cpp "
                   f"measures it at ppl {r['ppl']:.2f}, KLD {r['kld']:.4g}{share}: its excess over f32 is what "
                   "llama.cpp's 8-bit activation quantization costs on the model's own weights, a floor that the "
                   "share target at this cell asks a faithful file to go below.")
    return "".join(out)


def _tunece_example(rows) -> str:
    """': at <model> <PRESET> its ppl (x) is below the f32 model's (y) while its KLD is k times the untuned file's' for
    the first `+TUNECE` row that goes below f32 ('' if none does)."""
    for r in rows:
        if not (r.get("method") or "").endswith("+tunece") or "ppl" not in r:
            continue
        f32 = next((x for x in rows if x["model"] == r["model"] and x["file"].startswith("f32") and "ppl" in x), None)
        plain = next((x for x in rows if x["model"] == r["model"] and x.get("preset") == r["preset"]
                      and x.get("method") == r["method"].removesuffix("+tunece") and "ppl" in x), None)
        if f32 and plain and r["ppl"] < f32["ppl"] and plain.get("kld"):
            return (f": at {r['model']} {r['preset'].upper()} its ppl ({r['ppl']:.2f}) is below the f32 model's "
                    f"({f32['ppl']:.2f}) while its KLD is {r['kld'] / plain['kld']:.1f} times the untuned file's")
    return ""


def _picked(method: str) -> bool:
    """BENCH_GGUF_METHODS=admmq+tune,autoround reruns only these of our methods and peers (llama.cpp's rows, cheap,
    always run: every share is computed against a fresh imatrix row); unset: all."""
    pick = os.environ.get("BENCH_GGUF_METHODS")
    return not pick or method in pick.split(",")


def _autoround_row(model: str, preset: str, d: Path, chunks: int, base: Path, nsamples: int, seqlen: int) -> dict:
    """AutoRound (its defaults for the scheme, on CPU, our calibration windows) exported with its own GGUF writer;
    measured by llama.cpp like every other file, and by our loader (the file's weights dequantized by gguf-py)."""
    out = d / f"autoround-{preset}.gguf"
    res = autoround(model, out, AUTOROUND_SCHEME.get(preset, f"gguf:{preset}"), nsamples, seqlen, AUTOROUND_ITERS)
    row = {"model": model, "file": f"AutoRound {preset.upper()} (its GGUF exporter)", "preset": preset,
           "method": "autoround", "options": f"iters={AUTOROUND_ITERS}"}
    if "error" in res:
        return {**row, "options": f"not measured: {res['error']}"}
    return {**row, "seconds": res["seconds"], "MiB": out.stat().st_size / 2**20, **perplexity(out, chunks, kld_base=base),
            "ppl_ir": evaluate(str(out), WIKI, "llamacpp", chunks)["ppl"]}


def run(quick: bool = False) -> None:
    chunks = 8 if quick else 16
    nsamples, seqlen = (8 if quick else CALIB_NSAMPLES), 512
    models = [(MODELS[0][0], MODELS[0][1][:1])] if quick else MODELS
    only = os.environ.get("BENCH_GGUF_ONLY")  # e.g. "smollm2:q4_k_m+q2_k": rerun these; the rest keep their recorded rows
    if only:
        pick = dict((x.split(":") + [""])[:2] for x in only.split(","))
        # in the order given, so the presets that matter most can run first
        models = [(m, [q for q in pick[m].split("+") if q in p] if pick[m] else p) for m, p in models if m in pick]
    prev = recorded("gguf") if only or os.environ.get("BENCH_GGUF_METHODS") else {}
    old = mark_kept(prev.get("rows", []), prev)
    old_summary = prev.get("summary", [])
    knobs = run_knobs("BENCH_NSAMPLES", "BENCH_GGUF_ONLY", "BENCH_GGUF_METHODS", "BENCH_REUSE")
    t = time.time()
    rows, summary = [], []
    for model, presets in models:  # the section is rewritten after each preset: a run cut short keeps what it finished
        r, s = [], []
        for r, s in one_model(model, presets, chunks, nsamples, seqlen):
            fresh = {_row_key(x) for x in rows + r}  # a recorded row is replaced only by a new row of the same file
            keep = [x for x in old if _row_key(x) not in fresh]
            fresh_s = {_row_key(x) for x in summary + s}
            keep_s = [x for x in old_summary if _row_key(x) not in fresh_s]
            note = f" This run: `{knobs}python -m bench --suite gguf{' --quick' if quick else ''}`."
            if keep:
                note += (f" Rows not rerun this time ({len(keep)}) are kept from an earlier run of this suite on "
                         f"{', '.join(sorted({x['machine_cpu'] for x in keep}))}, with the calibration in their `calib` "
                         "column and the ADMM-Q options in their `options` column (blank: none).")
            _save(rows + r + keep, summary + s + keep_s, quick, chunks, time.time() - t, note)
        rows, summary = rows + r, summary + s


def _row_key(row: dict) -> tuple:
    """(model, PRESET, file or method) of a table or summary row; the f32 row has no preset (None)."""
    return row["model"], (row.get("preset") or "").upper() or None, row.get("file") or row.get("method")


def _size_note(rows) -> str:
    """A sentence naming each AutoRound file whose size differs from llama.cpp's file of the same preset ('' if none)."""
    ref = {(r["model"], r["preset"].upper()): r["MiB"] for r in rows
           if r.get("file", "").startswith("llama.cpp") and "imatrix" not in r["file"] and "MiB" in r}
    odd = [f"{r['preset'].upper()} {r['MiB']:.2f} MiB vs {ref[k]:.2f}" for r in rows
           if r.get("method") == "autoround" and "MiB" in r and (k := (r["model"], r["preset"].upper())) in ref
           and abs(r["MiB"] - ref[k]) > 0.5]
    return ("" if not odd else " AutoRound writes its own tensor-type mix for a preset, which differs from llama.cpp's "
            f"where the sizes differ ({'; '.join(odd)} for llama.cpp's file): those rows are not a same-size comparison.")


def _types_note(rows) -> str:
    """A sentence giving the tensor types of each (model, preset) file we wrote ('' if no row records them)."""
    types = {}
    for r in rows:
        if r.get("types") and r.get("preset"):
            types.setdefault(f"{r['model']} {r['preset'].upper()}", r["types"])
    return ("" if not types else " Tensor types of our files (llama.cpp's preset rule, so the same as its own file's; "
            "a tensor whose in-dim a K-quant's 256-blocks do not divide takes llama.cpp's fallback type, which at "
            f"SmolLM2's 576 and Gemma-3's 640 is most of them): {'; '.join(f'{k}: {v}' for k, v in types.items())}.")


def rerender() -> None:
    """Rewrite the section from its recorded JSON (after a change to the text; no measurement is repeated)."""
    d = recorded("gguf")
    for r in d["rows"]:  # an f32 row recorded before its size was: the size of that file, where it is still on disk
        f = OUT / "gguf" / r["model"] / "f32.gguf"
        if r["file"].startswith("f32") and "MiB" not in r and f.exists():
            r["MiB"] = f.stat().st_size / 2**20
        rep = OUT / "gguf" / r["model"] / f"ours-{r.get('method')}-{r.get('preset')}.gguf.report.json"
        if r.get("method") and "types" not in r and rep.exists():  # a row recorded before its tensor types were
            r["types"] = json.loads(rep.read_text())["report"].get("gguf types")
    _save(d["rows"], d["summary"], d.get("quick", False), d["chunks"], d["total_s"], d["note"], d["machine"])


def _save(rows, summary, quick, chunks, total_s, note="", mach=None) -> None:
    mach = mach or machine()
    plots = {m: _plot([r for r in rows if r["model"] == m], m) for m, _ in MODELS}
    md = [f"## GGUF vs llama.cpp's quantizer (`python -m bench --suite gguf{' --quick' if quick else ''}`)", "",
          f"SmolLM2-135M and Gemma-3-270M. Every perplexity and KLD is computed by llama.cpp's `llama-perplexity` (ctx 512, "
          f"first {chunks} chunks of WikiText-2 test, KLD against the model's f32 file's logits). Calibration for us and "
          "for `llama-imatrix`: the same C4 windows (seed 0; `calib` = samples x tokens; ', BOS': every window starts with BOS, as "
          "llama-imatrix and llama-perplexity put it there, for a model whose tokenizer adds one: Gemma-3). Ours: RTN; GPTQ (reference "
          "settings); ADMM-Q with the CLI options in `options` (`--clip-search`: group parameters from a diag(H)-weighted "
          f"clipping search, the role the imatrix plays in llama.cpp's scale search; `--refit`: the block scales refitted for "
          f"the final codes by H-weighted least squares, K-quant sub-scales/mins as integers under a refitted fp16 "
          f"super-scale; `--clip-mode refit`, rows `ADMMQ+LSCLIP`: the search over ranges x0.8 ... x1.1 with, for each "
          f"candidate, the diag(H)-weighted least-squares scales/offsets for its own codes (alternated 4 times), as "
          f"llama.cpp's make_qx_quants does with the imatrix; for the K-quants also per sub-block, from llama.cpp's "
          f"starts (codes anchored at the minimum), with a search over the fp16 super-scale).{note} Our files are written from the IR (codes packed, never re-rounded); "
          "llama.cpp's from the f32 GGUF we wrote, with `llama-quantize [--imatrix]`. `seconds`: llama-quantize, or our "
          "whole export (model load, calibration forward passes, quantizer, packing). AutoRound (SmolLM2 Q4_K_M, Q3_K_M, Q2_K): "
          f"auto-round's own scheme for the preset (Q2_K: its nearest, gguf:q2_k_s) with iters={AUTOROUND_ITERS} (its default 200 is ~4x the CPU time), batch 4, on "
          "our calibration windows, written by its own GGUF exporter; its `ppl_ir` is our evaluation of that file's weights "
          "(dequantized by gguf-py). `GPTQ+ASYM` / `ADMMQ+ASYM` (SmolLM2 Q3_K_M): the same methods with `--asym-calib` "
          "(GPTAQ-style asymmetric calibration: each linear fitted to the original model's outputs from the quantized "
          "model's inputs). `ADMMQ+TUNE`: ADMM-Q as above, then `--tune-steps` (one step per calibration window): the "
          "fp16 block fields the format stores as floats (`d`, `dmin`; codes, sub-scales and mins fixed) and the norm "
          "weights tuned end to end by Adam on KL to the original model over the calibration windows, kept only if KL "
          "on 4 held-out calibration windows drops; its `seconds` include that pass. `+TUNECE`: the same pass on "
          "`--tune-loss ce`, the calibration text's own next-token cross-entropy (the original model is not in the "
          "loop; kept only if held-out cross-entropy drops): it can move the model past the original on text like "
          f"the calibration's, so its KLD says how far it stays from the original model{_tunece_example(rows)}, so a `+TUNECE` "
          "row's share measures fitting to text, not how faithfully the file holds the model, and can exceed 1."
          " A rerun re-measures llama.cpp's own rows; its tools are built for the host (GGML_NATIVE) and their "
          "perplexities can move by ~0.1 between builds, so each share below is computed against the imatrix file "
          "measured in the same run as the row (its `imatrix_ppl`)."
          f"{_size_note(rows)}{_types_note(rows)}{_source_note(rows, summary)} "
          "Gemma-3-270M is only reachable offline as a Q4_K_M GGUF: its weights already sit on llama.cpp's Q4_K_M grid, so `llama-quantize` Q4_K_M (whose scale search lands on the same block values) nearly re-finds the original file — a re-quantization artefact, not a quantizer comparison; our min/max grid fit does not re-find those blocks, the per-sub-block refit search of `--clip-mode refit` does (Q4_K and Q6_K tensors to ~1e-8 relative error), and then both files hold nearly the source's weights and differ by llama.cpp's activation quantization. SmolLM2-135M comes from a Q4_1 file, which none of the presets reproduces whole; but its FFN-down tensors at Q4_K (sub-blocks of 32 with a min, as Q4_1) nearly re-find those blocks, so there the error left is the rounding of the 6-bit sub-scales and mins, which is what `--refit` optimises and what no code search can change.", "",
          md_table(rows, ["model", "calib", "file", "options", "MiB", "ppl", "excess", "kld", "ppl_ir", "seconds"]), "",
          "`ppl_ir`: our own evaluation (fp32 torch, the same windows) of the weights the file holds, from our IR (f32 "
          "row: the original model): what the weights cost without llama.cpp's 8-bit requantization of the activations "
          "in its quantized matmuls (blank: a row kept from a run before this column).", "",
          "Target (issue 9): at Q4_K_M, Q3_K_M and Q2_K, ADMM-Q removes at least half of the imatrix file's perplexity "
          "excess over f32 (share ≥ 0.5; negative: worse than the imatrix file).", "",
          md_table(summary, ["model", "calib", "preset", "method", "ppl", "imatrix_ppl", "share_of_imatrix_excess_removed",
                             "target_met(≥0.5)"]),
          "", *[f"![{m} ppl vs bits per weight](bench/plots/{f})" for m, f in plots.items() if f], "", f"Total {total_s:.0f} s. Machine: {mach}"]
    save_section("gguf", "\n".join(md), {"rows": rows, "summary": summary, "machine": mach, "quick": quick,
                                         "chunks": chunks, "total_s": total_s, "note": note})


PLOT_NAMES = {"smollm2": ("gguf_ppl.png", "SmolLM2-135M"), "gemma3-270m": ("gguf_ppl_gemma3.png", "Gemma-3-270M")}


def _plot(rows, model: str) -> str | None:
    """ppl vs bits per weight, one series per method, for one model; the PNG's name (None: no rows of that model)."""
    if not rows:
        return None

    def pick(key):
        if key == "llama.cpp":
            return lambda f: f.startswith("llama.cpp") and "imatrix" not in f
        if key == "ADMMQ":
            return lambda f: "ADMMQ " in f
        return lambda f: key in f and "+ASYM" not in f  # the asymmetric-calibration rows are not a series

    f32 = next(r for r in rows if r["file"].startswith("f32"))
    # bits per weight: a file's bits over the f32 file's weights (its bytes / 4; the metadata is < 0.1% of it)
    x = (lambda r: 32 * r["MiB"] / f32["MiB"]) if "MiB" in f32 else (lambda r: r["MiB"])
    series = {label: [(x(r), r["ppl"]) for r in rows if "MiB" in r and "ppl" in r and pick(key)(r["file"])]
              for label, key in (("llama.cpp", "llama.cpp"), ("llama.cpp + imatrix", "imatrix"), ("RTN", "RTN"),
                                 ("GPTQ", "GPTQ"), ("ADMM-Q", "ADMMQ"), ("ADMM-Q + tune", "ADMMQ+TUNE"),
                                 ("AutoRound", "AutoRound"))}
    name, title = PLOT_NAMES[model]
    xlabel = "bits per weight (file size x 32 / f32 file size)" if "MiB" in f32 else "file size (MiB)"
    ppl_plot(name, series, f32["ppl"], "f32", xlabel, "WikiText-2 perplexity (llama.cpp)",
             f"{title} GGUF: perplexity vs bits per weight", "o-")
    return name


if __name__ == "__main__":  # python -m bench.gguf --rerender
    import sys

    if sys.argv[1:] != ["--rerender"]:
        sys.exit("usage: python -m bench.gguf --rerender   (the suite itself runs with python -m bench --suite gguf)")
    rerender()

"""GPTQ/Marlin checkpoint benchmark (issue 5): perplexity of the written checkpoint reloaded from its own tensors
(independent unpacker, the kernels' fp16(s·(q−z))) beside our IR's, kernel pre-flight, export time.
Gemma-3-270M (every in-dim divides 128) at the Marlin grid W4 g128 sym; SmolLM2-135M (in-dim 576: no g128, no
Marlin) at W4 g64 asym."""
from __future__ import annotations

import json
import os

from .common import (OUT, WIKI, calib_label, cli, evaluate, export, machine, mark_kept, md_table, recorded, run_knobs,
                     save_section)

ALL = ("rtn", "gptq", "admmq")
# (model, target, bits, group, sym, methods): Marlin W4 g128 sym on Gemma-3 (SmolLM2's in-dim 576 does not divide
# 128), and W4 g64 asym, W3 g64 sym, W2 g32 asym on both models, each with RTN, GPTQ and ADMM-Q
RUNS = [("gemma3-270m", "marlin", 4, 128, True, ALL), ("smollm2", "gptq", 4, 64, False, ALL),
        ("gemma3-270m", "gptq", 4, 64, False, ALL), ("gemma3-270m", "gptq", 3, 64, True, ALL),
        ("gemma3-270m", "gptq", 2, 32, False, ALL), ("smollm2", "gptq", 3, 64, True, ALL),
        ("smollm2", "gptq", 2, 32, False, ALL)]


def _target(to: str, bits: int, group: int, sym: bool) -> str:
    return f"{to} W{bits} g{group} {'sym' if sym else 'asym'}"


def _key(run: tuple) -> tuple[str, str]:
    """(model, target) of an entry of RUNS, as a table row names it."""
    return run[0], _target(*run[1:5])


def _selected(quick: bool) -> list[tuple]:
    """The runs of this call: BENCH_GPTQ_ONLY="gemma3-270m:marlin W4 g128 sym,smollm2:gptq W3 g64 sym" reruns
    these (model:target as in the table); else all (quick: SmolLM2 W4 g64 asym, RTN and GPTQ)."""
    if quick:
        return [r[:5] + (("rtn", "gptq"),) for r in RUNS[1:2]]
    only = os.environ.get("BENCH_GPTQ_ONLY")
    if not only:
        return RUNS
    want = {tuple(x.strip().split(":", 1)) for x in only.split(",")}
    runs = [r for r in RUNS if _key(r) in want]
    if len(runs) != len(want):
        known = ", ".join(":".join(_key(r)) for r in RUNS)
        raise SystemExit(f"BENCH_GPTQ_ONLY={only!r}: unknown entry; the runs are: {known}")
    return runs


def run(quick: bool = False) -> None:
    wl = 4 if quick else 8
    nsamples, seqlen = (8, 256) if quick else (8, 512)
    runs = _selected(quick)
    # a partial rerun keeps the recorded rows of the runs it does not repeat (rows recorded before the `calib`
    # column predate BOS-first calibration: their windows were as cut)
    prev = recorded("gptq") if not quick and os.environ.get("BENCH_GPTQ_ONLY") else {}
    redo = {_key(r) for r in runs}
    keep = [{"calib": calib_label(nsamples, seqlen, None), **r} for r in mark_kept(prev.get("rows", []), prev)
            if r.get("target") != "original" and (r["model"], r["target"]) not in redo]
    # the `original` row of every model in the table, rerun or kept, is measured in this run
    models = dict.fromkeys([r[0] for r in runs] + [r["model"] for r in keep])
    rows = [{"model": m, "target": "original", "ppl_file": evaluate(m, WIKI, "llamacpp", wl)["ppl"]} for m in models]
    for model, to, bits, group, sym, methods in runs:
        for method in methods:
            out = OUT / "gptq" / f"{model}-{method}-{to}-w{bits}g{group}{'s' if sym else 'a'}"
            rep = export(model, to, out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                         "--sym" if sym else "--asym", "--nsamples", str(nsamples), "--seqlen", str(seqlen))
            _, chk = cli("check", str(out), "--json")
            ok = json.loads(chk)["ok"]
            _, pre = cli("check", str(out), "--kernels", "--json")
            pre = json.loads(pre)
            rows.append({"model": model, "target": _target(to, bits, group, sym), "method": method,
                         "calib": calib_label(nsamples, seqlen, rep["calibration"]["bos"]),
                         "ppl_file": evaluate(str(out), WIKI, "llamacpp", wl)["ppl"],
                         "ppl_ir": evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"],
                         "bit-exact": "yes" if ok else "NO", "marlin layers": f"{sum('marlin' in r['kernels'] for r in pre)}/{len(pre)}",
                         "format": rep["report"].get("checkpoint_format"), "export_s": rep["wall_seconds"],
                         "reused": "yes" if rep.get("reused") else ""})
    rows = _ordered(rows + keep)
    cmd = f"{run_knobs('BENCH_GPTQ_ONLY', 'BENCH_REUSE')}python -m bench --suite gptq{' --quick' if quick else ''}"
    kept = "" if not keep else (
        f" This run: `{cmd}`; the rows it did not repeat ({len(keep)}) are kept from an earlier run of this suite on "
        f"{', '.join(sorted({r['machine_cpu'] for r in keep}))}, with the calibration in their `calib` column.")
    md = [f"## GPTQ / Marlin checkpoints (`python -m bench --suite gptq{' --quick' if quick else ''}`)", "",
          f"Perplexity on the first {wl} WikiText-2 chunks of 512 tokens (llama.cpp protocol). `ppl_file`: the written "
          "checkpoint rebuilt from its own qweight/qzeros/scales/g_idx by our independent reader (the GPTQ kernels' "
          "`fp16(s·(q−z))`; plain tensors fp16), run in fp32 torch; `ppl_ir`: our fake-quant IR (same quantized weights, "
          "plain tensors fp32). `bit-exact`: `admmq-export check` (every layer's weight, 0 differing bits, through our "
          "unpacker and through transformers + GPTQModel 7.6.0's torch kernel, built without CUDA by `make install`). `marlin layers`: pre-flight (`check --kernels`). Calibration "
          f"{nsamples} x {seqlen} C4 tokens. Grids: Marlin W4 g128 sym on Gemma-3 (its in-dims all divide 128; SmolLM2's "
          "576 does not), W4 g64 asym, W3 g64 sym and W2 g32 asym on both models. `reused`: the checkpoint was written "
          "by an earlier run of this suite with the same arguments (BENCH_REUSE=1; its export_s is that run's), and "
          "was reloaded, checked and evaluated again in this one. `calib`: samples x tokens, ', BOS': every window starts "
          "with BOS (the tokenizer adds one: Gemma-3), as the model runs in evaluation." + kept, "",
          md_table(rows, ["model", "target", "method", "calib", "ppl_file", "ppl_ir", "bit-exact", "marlin layers", "format",
                          "export_s", "reused"]),
          "", f"Machine: {machine()}"]
    save_section("gptq", "\n".join(md), {"rows": rows, "machine": machine()})


def _ordered(rows: list[dict]) -> list[dict]:
    """Rows in RUNS order (each model's `original` row first), methods in RTN, GPTQ, ADMM-Q order."""
    order = {_key(r): i for i, r in enumerate(RUNS)}
    first = {}
    for r in rows:
        if r["target"] != "original":
            first[r["model"]] = min(first.get(r["model"], 99), order.get((r["model"], r["target"]), 99))

    def key(r):
        if r["target"] == "original":
            return first.get(r["model"], 99), -1, 0
        return order.get((r["model"], r["target"]), 99), 0, ALL.index(r["method"]) if r["method"] in ALL else 9
    return sorted(rows, key=key)

"""GPTQ/Marlin checkpoint benchmark (issue 5): perplexity of the written checkpoint reloaded from its own tensors
(independent unpacker, the kernels' fp16(s·(q−z))) beside our IR's, kernel pre-flight, export time.
Gemma-3-270M (every in-dim divides 128) at the Marlin grid W4 g128 sym; SmolLM2-135M (in-dim 576: no g128, no
Marlin) at W4 g64 asym."""
from __future__ import annotations

import json

from .common import OUT, WIKI, cli, evaluate, export, machine, md_table, save_section

ALL = ("rtn", "gptq", "admmq")
# (model, target, bits, group, sym, methods): Marlin W4 g128 sym on Gemma-3 (SmolLM2's in-dim 576 does not divide
# 128), and W4 g64 asym, W3 g64 sym, W2 g32 asym on both models, each with RTN, GPTQ and ADMM-Q
RUNS = [("gemma3-270m", "marlin", 4, 128, True, ALL), ("smollm2", "gptq", 4, 64, False, ALL),
        ("gemma3-270m", "gptq", 4, 64, False, ALL), ("gemma3-270m", "gptq", 3, 64, True, ALL),
        ("gemma3-270m", "gptq", 2, 32, False, ALL), ("smollm2", "gptq", 3, 64, True, ALL),
        ("smollm2", "gptq", 2, 32, False, ALL)]


def run(quick: bool = False) -> None:
    wl = 4 if quick else 8
    nsamples, seqlen = (8, 256) if quick else (8, 512)
    runs = [r[:5] + (("rtn", "gptq"),) for r in RUNS[1:2]] if quick else RUNS
    rows = []
    for model, to, bits, group, sym, methods in runs:
        if not any(r["model"] == model and r["target"] == "original" for r in rows):
            rows.append({"model": model, "target": "original", "ppl_file": evaluate(model, WIKI, "llamacpp", wl)["ppl"]})
        for method in methods:
            out = OUT / "gptq" / f"{model}-{method}-{to}-w{bits}g{group}{'s' if sym else 'a'}"
            rep = export(model, to, out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                         "--sym" if sym else "--asym", "--nsamples", str(nsamples), "--seqlen", str(seqlen))
            _, chk = cli("check", str(out), "--json")
            ok = json.loads(chk)["ok"]
            _, pre = cli("check", str(out), "--kernels", "--json")
            pre = json.loads(pre)
            rows.append({"model": model, "target": f"{to} W{bits} g{group} {'sym' if sym else 'asym'}", "method": method,
                         "ppl_file": evaluate(str(out), WIKI, "llamacpp", wl)["ppl"],
                         "ppl_ir": evaluate(f"{out}.ir", WIKI, "llamacpp", wl)["ppl"],
                         "bit-exact": "yes" if ok else "NO", "marlin layers": f"{sum('marlin' in r['kernels'] for r in pre)}/{len(pre)}",
                         "format": rep["report"].get("checkpoint_format"), "export_s": rep["wall_seconds"],
                         "reused": "yes" if rep.get("reused") else ""})
    md = [f"## GPTQ / Marlin checkpoints (`python -m bench --suite gptq{' --quick' if quick else ''}`)", "",
          f"Perplexity on the first {wl} WikiText-2 chunks of 512 tokens (llama.cpp protocol). `ppl_file`: the written "
          "checkpoint rebuilt from its own qweight/qzeros/scales/g_idx by our independent reader (the GPTQ kernels' "
          "`fp16(s·(q−z))`; plain tensors fp16), run in fp32 torch; `ppl_ir`: our fake-quant IR (same quantized weights, "
          "plain tensors fp32). `bit-exact`: `admmq-export check` (every layer's weight, 0 differing bits, through our "
          "unpacker and through transformers + GPTQModel 7.6.0's torch kernel, built without CUDA by `make install`). `marlin layers`: pre-flight (`check --kernels`). Calibration "
          f"{nsamples} x {seqlen} C4 tokens. Grids: Marlin W4 g128 sym on Gemma-3 (its in-dims all divide 128; SmolLM2's "
          "576 does not), W4 g64 asym, W3 g64 sym and W2 g32 asym on both models. `reused`: the checkpoint was written "
          "by an earlier run of this suite with the same arguments (BENCH_REUSE=1; its export_s is that run's), and "
          "was reloaded, checked and evaluated again in this one.", "",
          md_table(rows, ["model", "target", "method", "ppl_file", "ppl_ir", "bit-exact", "marlin layers", "format", "export_s", "reused"]),
          "", f"Machine: {machine()}"]
    save_section("gptq", "\n".join(md), {"rows": rows, "machine": machine()})

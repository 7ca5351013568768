"""Foundation benchmark (issue 2): SmolLM2-135M WikiText-2 perplexity, both protocols, original vs RTN
W4/W3/W2 at group 32/64, sym and asym; seconds per layer; peak memory."""
from __future__ import annotations

from .common import OUT, WIKI, evaluate, export, machine, md_table, save_section

MODEL = "smollm2"


def run(quick: bool = False) -> None:
    wl, wg = (8, 2) if quick else (16, 8)  # windows: llama.cpp protocol (512) and GPTQ protocol (2048)
    grids = [(b, g, s) for b in (4, 3, 2) for g in (32, 64) for s in (True, False)]
    if quick:
        grids = grids[::3]
    rows = [{"config": "original (fp32)",
             "ppl_llamacpp": evaluate(MODEL, WIKI, "llamacpp", wl)["ppl"],
             "ppl_gptq": evaluate(MODEL, WIKI, "gptq", wg, 2048)["ppl"]}]
    for bits, group, sym in grids:
        out = OUT / "rtn" / f"smollm2-rtn-w{bits}g{group}{'s' if sym else 'a'}.ir"
        rep = export(MODEL, "ir", out, "--method", "rtn", "--bits", str(bits), "--group-size", str(group),
                     "--sym" if sym else "--asym")
        stats = rep["stats"]
        per_layer = sum(s["seconds"] for s in stats.values()) / 30
        rows.append({"config": f"RTN W{bits} g{group} {'sym' if sym else 'asym'}",
                     "ppl_llamacpp": evaluate(str(out), WIKI, "llamacpp", wl)["ppl"],
                     "ppl_gptq": evaluate(str(out), WIKI, "gptq", wg, 2048)["ppl"],
                     "s_per_layer": per_layer, "export_s": rep["wall_seconds"],
                     "peak_rss_mib": rep["report"]["peak_rss_mib"]})
    md = [f"## Foundation: RTN on SmolLM2-135M (`python -m bench --suite rtn{' --quick' if quick else ''}`)", "",
          f"WikiText-2 test; llama.cpp protocol = first {wl} chunks of 512 tokens, second half scored; GPTQ protocol = "
          f"first {wg} windows of 2048 tokens. Quantized models are evaluated as our fake-quant IR (fp32 torch). "
          "SmolLM2's weights come from a Q4_1 file (4-bit, group 32, float min): W4 g32 asym sits close to that grid, "
          "but not on it (integer zero points, min clamped to ≤ 0), so it is not lossless; compare it with care. Seconds per layer: quantization only (RTN needs no calibration); peak "
          "memory: RSS of the whole export process.", "",
          md_table(rows, ["config", "ppl_llamacpp", "ppl_gptq", "s_per_layer", "export_s", "peak_rss_mib"]), "",
          f"Machine: {machine()}"]
    save_section("rtn", "\n".join(md), {"rows": rows, "machine": machine()})

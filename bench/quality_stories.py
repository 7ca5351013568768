"""The quality table's stories260K part (issue 10): the true-fp32 tiny Llama (5 layers, dim 64, context 128),
RTN / GPTQ / ADMM-Q on the same grids and calibration, written as ONNX and run in ONNX Runtime, beside our IR.

Its FFN down projection has in-dim 172 (= 4 x 43), which no group of 32 divides: that tensor takes the explicit
per-channel fallback (`--fallback per-channel`, reported by the export) on every row alike. Calibration: C4 windows
of the model's whole context (128 tokens; the issues' 128 samples), seed 0, BOS first (its tokenizer adds one).
Evaluation: TinyStories (the model's own domain; ../shared/data/tinystories-sample.txt), llama.cpp protocol with
128-token windows, KLD vs the fp32 model.
"""
from __future__ import annotations

from .common import OUT, calib_label, evaluate, export, ppl_plot

MODEL = "stories260k"
DATA = "tinystories-sample.txt"
GRIDS = [(4, 32, False), (3, 32, False), (2, 32, False)]
METHODS = ["rtn", "gptq", "admmq"]
SEQLEN = 128
NSAMPLES = 128
WINDOWS = 48  # of the sample's ~7.5k tokens, 48 x 128 (the second half of each window scored)


def _eval(target: str, reference: str | None = None) -> dict:
    return evaluate(target, DATA, "llamacpp", WINDOWS, seqlen=SEQLEN, reference=reference)


def run(gname) -> tuple[list[dict], dict]:
    """(rows, the original's row) for the stories260K table; `gname(bits, group, sym)` names a grid."""
    base = _eval(MODEL)
    rows = [{"grid": "-", "method": "original", "ppl_file": base["ppl"]}]
    for bits, group, sym in GRIDS:
        for method in METHODS:
            out = OUT / "quality" / f"stories-{method}-w{bits}g{group}{'s' if sym else 'a'}.onnx"
            rep = export(MODEL, "onnx", out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                         "--sym" if sym else "--asym", "--fallback", "per-channel", "--nsamples", str(NSAMPLES),
                         "--seqlen", str(SEQLEN))
            f = _eval(str(out), MODEL)
            rows.append({"grid": gname(bits, group, sym), "method": method,
                         "calib": calib_label(NSAMPLES, SEQLEN, rep["calibration"]["bos"]),
                         "ppl_file": f["ppl"], "ppl_ir": _eval(f"{out}.ir")["ppl"], "kld": f.get("kld"),
                         "quant_s": sum(s["seconds"] for s in rep["stats"].values()),
                         "fallback": _fallbacks(rep["report"])})
    return rows, base


def _fallbacks(report: dict) -> str:
    """'5 tensors (*.mlp.down_proj.weight): in-dim 172 ...' from the export report's `fallback NAME` entries."""
    fb = {k[len("fallback "):]: v for k, v in report.items() if k.startswith("fallback ")}
    if not fb:
        return "-"
    kinds = sorted({".".join(k.split(".")[-3:]) for k in fb})
    return f"{len(fb)} tensors ({', '.join(kinds)}): " + "; ".join(sorted(set(fb.values())))


def plot(rows: list[dict], bpw) -> str:
    """ppl vs bits per weight per method (`bpw(grid name)`); the image's markdown."""
    series = {m: [(bpw(r["grid"]), r["ppl_file"]) for r in rows if r["method"] == m] for m in METHODS}
    ppl_plot("quality_stories_ppl_bits.png", series, rows[0]["ppl_file"], "fp32", "bits per weight (codes + group "
             "parameters)", "TinyStories perplexity", "stories260K: perplexity vs bits")
    return "![stories260K ppl vs bits](bench/plots/quality_stories_ppl_bits.png)"

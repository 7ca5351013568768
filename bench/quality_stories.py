"""The quality table's stories260K part (issue 10): the true-fp32 tiny Llama (5 layers, dim 64, context 128),
RTN / GPTQ / ADMM-Q on the same grids and calibration, written as ONNX and run in ONNX Runtime, beside our IR.

Its FFN down projection has in-dim 172 (= 4 x 43), which no group of 32 divides: that tensor takes the explicit
per-channel fallback (`--fallback per-channel`, reported by the export) on every row alike. Calibration: C4 windows
of the model's whole context (128 tokens; the issues' 128 samples), seed 0, BOS first (its tokenizer adds one).
Evaluation: TinyStories (the model's own domain; ../shared/data/tinystories-sample.txt), llama.cpp protocol with
128-token windows, KLD vs the fp32 model. AutoRound (iters=50, batch 4, the same windows, its `auto_gptq` export
read back by our GPTQ loader) skips every linear with a dim its group size does not divide, so its rows are not on
the same grid: the linears it left unquantized are named under the table, and its rows are left out of the plot.
Rows `METHOD, 1 thread` / `METHOD, no SIMD`: the same export with OMP_NUM_THREADS=1 / ATEN_CPU_CAPABILITY=default
(the table's rows: torch's default threads and SIMD level, in the machine line), ADMM-Q on every grid and RTN and
GPTQ on the first; `same_ir`: whether its IR's codes and parameters equal the table row's byte for byte (README,
Reproducibility). Those rows are left out of the plot.
"""
from __future__ import annotations

import hashlib
import json

from .autoround_peer import autoround
from .common import OUT, calib_label, evaluate, export, ppl_plot

MODEL = "stories260k"
DATA = "tinystories-sample.txt"
GRIDS = [(4, 32, False), (3, 32, False), (2, 32, False)]
METHODS = ["rtn", "gptq", "admmq"]
SEQLEN = 128
NSAMPLES = 128
WINDOWS = 48  # of the sample's ~7.5k tokens, 48 x 128 (the second half of each window scored)
AR_ITERS = 50
SETTINGS = {"1 thread": {"OMP_NUM_THREADS": "1"}, "no SIMD": {"ATEN_CPU_CAPABILITY": "default"}}


def _eval(target: str, reference: str | None = None) -> dict:
    return evaluate(target, DATA, "llamacpp", WINDOWS, seqlen=SEQLEN, reference=reference)


def _path(method: str, bits: int, group: int, sym: bool, tag: str = ""):
    return OUT / "quality" / f"stories-{method}-w{bits}g{group}{'s' if sym else 'a'}{tag}.onnx"


def _export(method: str, bits: int, group: int, sym: bool, tag: str = "", env: dict | None = None):
    """(the ONNX file, the export's report) of one stories260K row."""
    out = _path(method, bits, group, sym, tag)
    rep = export(MODEL, "onnx", out, "--method", method, "--bits", str(bits), "--group-size", str(group),
                 "--sym" if sym else "--asym", "--fallback", "per-channel", "--nsamples", str(NSAMPLES),
                 "--seqlen", str(SEQLEN), env=env)
    return out, rep


def _row(grid: str, method: str, out, rep, ir: bool = True) -> dict:
    f = _eval(str(out), MODEL)
    return {"grid": grid, "method": method, "calib": calib_label(NSAMPLES, SEQLEN, rep["calibration"]["bos"]),
            "ppl_file": f["ppl"], "ppl_ir": _eval(f"{out}.ir")["ppl"] if ir else None, "kld": f.get("kld"),
            "quant_s": sum(s["seconds"] for s in rep["stats"].values()), "fallback": _fallbacks(rep["report"])}


def _ir_hash(onnx_out) -> str:
    return hashlib.sha256((onnx_out.parent / f"{onnx_out.name}.ir" / "ir.safetensors").read_bytes()).hexdigest()


def _setting_rows(gname) -> list[dict]:
    """The SETTINGS rows: ADMM-Q on every grid, RTN and GPTQ on the first, each against the table row's IR."""
    rows = []
    for i, (bits, group, sym) in enumerate(GRIDS):
        for method in METHODS if i == 0 else ["admmq"]:
            ref = _ir_hash(_path(method, bits, group, sym))  # the table's row, written by run() just before
            for name, env in SETTINGS.items():
                out, rep = _export(method, bits, group, sym, "-" + name.replace(" ", "-"), env)
                rows.append({**_row(gname(bits, group, sym), f"{method}, {name}", out, rep, ir=False),
                             "same_ir": "yes" if _ir_hash(out) == ref else "no"})
    return rows


def run(gname) -> tuple[list[dict], dict]:
    """(rows, the original's row) for the stories260K table; `gname(bits, group, sym)` names a grid."""
    base = _eval(MODEL)
    rows = [{"grid": "-", "method": "original", "ppl_file": base["ppl"]}]
    for bits, group, sym in GRIDS:
        for method in METHODS:
            rows.append(_row(gname(bits, group, sym), method, *_export(method, bits, group, sym)))
        rows.append(_autoround_row(bits, group, sym, gname(bits, group, sym)))
    return rows + _setting_rows(gname), base


def _autoround_row(bits: int, group: int, sym: bool, grid: str) -> dict:
    out = OUT / "quality" / f"stories-autoround-w{bits}g{group}{'s' if sym else 'a'}"
    ar = autoround(MODEL, out, "auto_gptq", NSAMPLES, SEQLEN, AR_ITERS, bits, group, sym)
    if "error" in ar:
        return {"grid": grid, "method": f"autoround (not measured: {ar['error']})"}
    f = _eval(str(out), MODEL)
    return {"grid": grid, "method": f"autoround iters={AR_ITERS}", "calib": calib_label(NSAMPLES, SEQLEN, ar["calib_bos"]),
            "ppl_file": f["ppl"], "kld": f.get("kld"), "quant_s": ar["seconds"], "skipped": _skipped(out)}


def _skipped(ckpt) -> str:
    """'15 linears (mlp.down_proj, ...)': the modules a GPTQModel-style checkpoint excludes (`dynamic` '-:' rules)."""
    dyn = json.loads((ckpt / "config.json").read_text())["quantization_config"].get("dynamic", {})
    mods = [k[2:].replace("\\", "").strip(".*") for k in dyn if k.startswith("-:")]
    kinds = sorted({".".join(m.split(".")[-2:]) for m in mods})
    return f"{len(mods)} linears ({', '.join(kinds)})" if mods else "none"


def _fallbacks(report: dict) -> str:
    """'5 tensors (*.mlp.down_proj.weight): in-dim 172 ...' from the export report's `fallback NAME` entries."""
    fb = {k[len("fallback "):]: v for k, v in report.items() if k.startswith("fallback ")}
    if not fb:
        return "-"
    kinds = sorted({".".join(k.split(".")[-3:]) for k in fb})
    return f"{len(fb)} tensors ({', '.join(kinds)}): " + "; ".join(sorted(set(fb.values())))


def plot(rows: list[dict], bpw) -> str:
    """ppl vs bits per weight per method (`bpw(grid name)`); the image's markdown."""
    series = {m: [(bpw(r["grid"]), r["ppl_file"]) for r in rows if r["method"] == m] for m in METHODS}  # same grid only
    ppl_plot("quality_stories_ppl_bits.png", series, rows[0]["ppl_file"], "fp32", "bits per weight (codes + group "
             "parameters)", "TinyStories perplexity", "stories260K: perplexity vs bits")
    return "![stories260K ppl vs bits](bench/plots/quality_stories_ppl_bits.png)"

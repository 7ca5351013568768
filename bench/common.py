"""Shared pieces of the benchmark suites: run the real CLI, evaluate, record the machine and versions."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # scratch (ignored): written models
RESULTS = ROOT / "bench" / "results"  # committed: one markdown section + one JSON per suite
PLOTS = ROOT / "bench" / "plots"  # committed: PNG plots referenced from BENCHMARKS.md
WIKI = "wikitext2-test.txt"
C4_VAL = "c4-validation-2k.parquet"
# calibration windows of the suites that follow the issues' protocol (128 x 512 C4 tokens, seed 0);
# BENCH_NSAMPLES=N makes a cheaper run (the section text records what was used)
CALIB_NSAMPLES = int(os.environ.get("BENCH_NSAMPLES", "128"))


def shared_data(name: str) -> str:
    from admmq_export.paths import shared

    return str(shared("data", name))


def cli(*args: str, timeout: int = 7200, env: dict | None = None) -> tuple[float, str]:
    """Run `admmq-export ARGS` in a subprocess (`env`: variables set on top of ours); (seconds, stdout). Raises with
    stderr on failure."""
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "admmq_export", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if p.returncode:
        raise RuntimeError(f"admmq-export {' '.join(args)} failed: {p.stderr.strip()[-2000:]}")
    return time.time() - t, p.stdout


def export(model: str, to: str, out: Path, *extra: str, env: dict | None = None) -> dict:
    """Export and return the JSON report (stats per layer, seconds, peak RSS), with `wall_seconds` and `reused`.

    With BENCH_REUSE=1 an output written earlier by this function with the same arguments (its `.bench.json`
    records them and the export's wall time) is used as it is, so a suite rerun only exports what is new."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = out.with_name(out.name + ".report.json")
    args = [model, "--to", to, "-o", str(out), "--quiet", "--json-report", str(rep), *extra]
    key = [*args, *(f"env:{k}={v}" for k, v in sorted((env or {}).items()))]  # what the stamp records
    prev = earlier_run(out, key) if rep.is_file() else None
    # a report without `calibration` predates BOS-first calibration windows: same arguments, other windows
    if prev is not None and "calibration" in (old := json.loads(rep.read_text())):
        print(f"reusing {out} (exported in {prev['wall_seconds']:.0f}s)", flush=True)
        return {**old, "wall_seconds": prev["wall_seconds"], "reused": True}
    secs, _ = cli(*args, env=env)
    stamp_run(out, key, wall_seconds=secs)
    return {**json.loads(rep.read_text()), "wall_seconds": secs, "reused": False}


def calib_label(nsamples: int, seqlen: int, bos: bool | None) -> str:
    """The `calib` column: samples x tokens, and ', BOS' where every window started with BOS (the tokenizer adds
    one: Gemma-3, stories260K; `export`'s report says so under calibration.bos)."""
    return f"{nsamples} x {seqlen}" + (", BOS" if bos else "")


def earlier_run(out: Path, args: list[str]) -> dict | None:
    """Under BENCH_REUSE=1, the stamp (`<out>.bench.json`) of an earlier run that wrote `out` with these exact
    arguments, else None."""
    stamp = out.with_name(out.name + ".bench.json")
    if os.environ.get("BENCH_REUSE") != "1" or not out.exists() or not stamp.is_file():
        return None
    prev = json.loads(stamp.read_text())
    return prev if prev.get("args") == args else None


def stamp_run(out: Path, args: list[str], **info) -> None:
    """Record the arguments that wrote `out` (and what the run measured) for `earlier_run`."""
    out.with_name(out.name + ".bench.json").write_text(json.dumps({"args": args, **info}))


def evaluate(target: str, data: str, protocol: str, windows: int, seqlen: int | None = None, reference: str | None = None) -> dict:
    args = ["eval", target, "--data", shared_data(data), "--protocol", protocol, "--max-windows", str(windows), "--json"]
    if seqlen:
        args += ["--seqlen", str(seqlen)]
    if reference:
        args += ["--reference", reference]
    _, out = cli(*args)
    return json.loads(out.strip().splitlines()[-1])


def machine() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            # ADMM-Q's codes follow the float summation order of the CPU kernels (README, Reproducibility)
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # installed versions of the optional packages the rows depend on (from their metadata: nothing is imported)
    for key, dist in (("gguf", "gguf"), ("onnxruntime", "onnxruntime"), ("llama_cpp", "llama_cpp_python"),
                      ("auto_round", "auto-round")):
        try:
            info[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "\\|")  # a cell's own bars would split it

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def recorded(name: str) -> dict:
    """The JSON a suite saved last time (empty if none): the source of the rows a partial rerun keeps."""
    f = RESULTS / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def mark_kept(rows: list[dict], prev: dict) -> list[dict]:
    """Rows kept from a recorded run, each marked with the CPU it was measured on (a mark it already has wins)."""
    return [{"machine_cpu": prev.get("machine", {}).get("cpu", "?"), **r} for r in rows]


def run_knobs(*names: str) -> str:
    """The BENCH_* variables of this run as a shell prefix for the section's command line ('' if none are set)."""
    return "".join(f"{k}={os.environ[k]!r} " if " " in os.environ[k] else f"{k}={os.environ[k]} "
                   for k in names if k in os.environ)


def save_section(name: str, markdown: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def ppl_plot(name: str, series: dict[str, list[tuple[float, float]]], baseline: float, baseline_label: str,
             xlabel: str, ylabel: str, title: str, style: str = "o") -> None:
    """One PNG under bench/plots: perplexity (log scale) per series against x, with the unquantized baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        if pts:
            ax.plot(*zip(*sorted(pts)), style, label=label)
    ax.axhline(baseline, color="k", ls="--", lw=0.8, label=baseline_label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(PLOTS / name, dpi=120)
    plt.close(fig)

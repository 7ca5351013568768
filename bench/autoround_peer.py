"""AutoRound (intel/auto-round) as a peer, run on CPU on the same calibration text and exported with its own
exporters (GPTQ safetensors, or GGUF). Run as a subprocess so its memory is its own:

    python -m bench.autoround_peer MODEL OUT --format auto_gptq|gguf:q4_k_m --bits 4 --group-size 64 --sym
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def autoround(model: str, out: Path, fmt: str, nsamples: int, seqlen: int, iters: int, bits: int | None = None,
              group: int | None = None, sym: bool = True) -> dict:
    """Run this module in a subprocess on our calibration windows; its JSON result, or {"error": ...}. Under
    BENCH_REUSE=1 a run with the same arguments is used as it is (bench.common.earlier_run)."""
    import importlib.util
    import subprocess

    from .common import ROOT, earlier_run, shared_data, stamp_run

    if importlib.util.find_spec("auto_round") is None:
        return {"error": "auto-round is not installed in this environment (pip install -e '.[peers]')"}
    args = [sys.executable, "-m", "bench.autoround_peer", model, str(out), "--format", fmt, "--iters", str(iters),
            "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--batch-size", "4",
            "--calib", shared_data("c4-train-00000-first1000.jsonl")]
    if bits is not None:
        args += ["--bits", str(bits), "--group-size", str(group)] + ([] if sym else ["--asym"])
    prev = earlier_run(out, args[1:])
    if prev is not None:
        print(f"reusing {out} (AutoRound ran {prev['result']['seconds']:.0f}s)", flush=True)
        return prev["result"]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1][:200]}
    result = json.loads(p.stdout.strip().splitlines()[-1])
    stamp_run(out, args[1:], result=result)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--format", default="auto_gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from auto_round import AutoRound

    from admmq_export.calib import bos_id, calibration_samples
    from admmq_export.models import load_model

    torch.manual_seed(a.seed)
    lm = load_model(a.model)
    # the same token windows our pipeline calibrates on, decoded back to text for AutoRound's loader (as cut: its
    # tokenizer call puts BOS first itself where the tokenizer adds one, as our windows have it)
    samples = calibration_samples(lm.tokenizer, a.calib, a.nsamples, a.seqlen, a.seed, bos=False)
    texts = [lm.tokenizer.decode(s) for s in samples]
    t = time.time()
    kw = {}
    hf = Path(a.out + ".hfdir")  # its GGUF path reads tensor names back from the model's own safetensors folder
    shutil.rmtree(hf, ignore_errors=True)
    lm.model.save_pretrained(str(hf))
    lm.tokenizer.save_pretrained(str(hf))
    lm.model.config._name_or_path = lm.model.name_or_path = str(hf)
    if a.format.startswith("gguf"):
        kw["scheme"] = a.format.upper()  # its preset names: "GGUF:Q4_K_M"
    else:
        kw.update(bits=a.bits, group_size=a.group_size, sym=not a.asym)
    ar = AutoRound(lm.model, lm.tokenizer, iters=a.iters, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size,
                   dataset=texts, device_map="cpu", seed=a.seed, **kw)
    tmp = Path(a.out + ".tmpdir")
    shutil.rmtree(tmp, ignore_errors=True)
    ar.quantize_and_save(str(tmp), format=a.format)
    secs = time.time() - t
    produced = [p for p in tmp.rglob("*") if p.is_file()]
    ggufs = [p for p in produced if p.suffix == ".gguf"]
    out = Path(a.out)
    if ggufs:
        shutil.move(str(ggufs[0]), out)
    else:
        cfgs = [p.parent for p in produced if p.name == "config.json"]
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(str(cfgs[0]), out)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(hf, ignore_errors=True)
    print(json.dumps({"seconds": secs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "out": str(out), "iters": a.iters, "nsamples": a.nsamples, "seqlen": a.seqlen,
                      "calib_bos": bos_id(lm.tokenizer) is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-stage`: download into the ignored `.gpu_stage/` what the GPU host (no network) needs for
`admmq-export check OUT --gpu` (../shared/docs/gpu_kernels.md §5.0):

- GPTQModel 7.7.0 sdist -> only its Marlin sources (`gptqmodel_ext/marlin`, kernel instantiations generated
  here with its own `generate_kernels.py`), `gptqmodel/utils/marlin_scalar_type.py` and the TritonV2
  `triton_utils/dequant.py`; the tarball itself is deleted.
- ggml-python 0.0.45 sdist (ggml-cuda is built from it on the host, §5.2).
- gemlite 0.6.0.post2 (a pure-Python sdist, turned into a wheel here) and the gguf 0.19.0 wheel.

Everything goes through pip (`pip download`, `pip wheel`). The plan is a static table, so `--dry-run` prints
what would be fetched and the size budget without any network. A MANIFEST.json (name, size, sha256 of every
staged file) is written last; the total must stay under BUDGET_MB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".gpu_stage"
BUDGET_MB = 60.0

GPTQMODEL = "gptqmodel-7.7.0"
# (what, pip spec, how, expected compressed MB per gpu_kernels.md §0/§3 [D], what the GPU host does with it)
PLAN = [
    ("gptqmodel", "gptqmodel==7.7.0", "sdist", 1.6, "Marlin JIT sources + TritonV2 dequant (extracted, tarball deleted)"),
    ("ggml-python", "ggml-python==0.0.45", "sdist", 3.4, "ggml-cuda / ggml-cpu build on the host (GGML_CUDA=ON)"),
    ("gemlite", "gemlite==0.6.0.post2", "sdist->wheel", 0.2, "Triton GEMM (pip install --no-index --no-deps)"),
    ("gguf", "gguf==0.19.0", "wheel", 0.12, "gguf-py CPU reference on the host"),
]
# parts of the GPTQModel sdist kept (relative to its top folder)
GPTQMODEL_KEEP = ("gptqmodel_ext/marlin/", "gptqmodel/utils/marlin_scalar_type.py",
                  "gptqmodel/nn_modules/triton_utils/")


def plan_text() -> str:
    lines = [f"stage folder: {STAGE}", f"{'package':14s} {'pip spec':24s} {'kind':13s} {'~MB':>6s}  use"]
    for name, spec, kind, mb, use in PLAN:
        lines.append(f"{name:14s} {spec:24s} {kind:13s} {mb:6.2f}  {use}")
    total = sum(p[3] for p in PLAN)
    lines.append(f"expected total {total:.2f} MB of a {BUDGET_MB:.0f} MB budget ({'within' if total <= BUDGET_MB else 'OVER'})")
    return "\n".join(lines)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _extract_gptqmodel(stage: Path) -> None:
    tgz = next(stage.glob(f"{GPTQMODEL}.tar.gz"))
    with tarfile.open(tgz) as tf:
        keep = [m for m in tf.getmembers() if m.isfile() and any(m.name.startswith(f"{GPTQMODEL}/{k}") for k in GPTQMODEL_KEEP)]
        if not keep:
            raise SystemExit(f"{tgz.name}: none of {GPTQMODEL_KEEP} found")
        tf.extractall(stage, members=keep, filter="data")
    marlin = stage / GPTQMODEL / "gptqmodel_ext" / "marlin"
    gen = marlin / "generate_kernels.py"
    # the sdist ships only kernel_*_ku8.cu; the generator writes every kernel_{fp16,bf16}_<type>.cu (needs jinja2)
    subprocess.run([sys.executable, gen.name], cwd=marlin, check=True)
    subprocess.run([sys.executable, gen.name, "--check"], cwd=marlin, check=True)
    tgz.unlink()


def manifest(stage: Path) -> dict:
    files = []
    for f in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != "MANIFEST.json"):
        files.append({"name": str(f.relative_to(stage)), "size": f.stat().st_size,
                      "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    total = sum(f["size"] for f in files)
    return {"budget_mb": BUDGET_MB, "total_bytes": total, "total_mb": round(total / 2**20, 3), "files": files}


def stage(dest: Path = STAGE) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    d = str(dest)
    sdists = [spec for _, spec, kind, _, _ in PLAN if kind.startswith("sdist")]
    _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", d, *sdists)
    for tgz in dest.glob("gemlite-*.tar.gz"):
        _pip("wheel", "-q", "--no-deps", "-w", d, str(tgz))
        tgz.unlink()
    wheels = [spec for _, spec, kind, _, _ in PLAN if kind == "wheel"]
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "-d", d, *wheels)
    _extract_gptqmodel(dest)
    m = manifest(dest)
    (dest / "MANIFEST.json").write_text(json.dumps(m, indent=1))
    if m["total_mb"] > BUDGET_MB:
        raise SystemExit(f"{dest} holds {m['total_mb']} MB, over the {BUDGET_MB} MB budget")
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels_check.gpu_stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and size budget; fetch nothing")
    ap.add_argument("--dest", default=str(STAGE))
    a = ap.parse_args(argv)
    if a.dry_run:
        print(plan_text())
        return 0
    m = stage(Path(a.dest))
    print(f"staged {len(m['files'])} files, {m['total_mb']} MB (budget {BUDGET_MB} MB); manifest {Path(a.dest) / 'MANIFEST.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

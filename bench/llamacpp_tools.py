"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built from the
llama.cpp tree vendored in the llama-cpp-python sdist, so the tools match the library our checks load.

    python -m bench.llamacpp_tools build [--sdist PATH] [-j 2]   # CPU cmake build into the cache (minutes)
    python -m bench.llamacpp_tools where                          # print the binaries' folder

The build lives in `<cache>/llama-tools/` (`$ADMMQ_CACHE`, default ~/.cache/admmq-export): `src/` (the
unpacked vendor/llama.cpp), `build/` (cmake) and `bin/` (the three binaries plus their shared libraries).
Nothing is committed. The sdist is looked for in $LLAMA_CPP_SDIST, the cache's `sdist/` folder and /tmp/dl,
and downloaded with `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION` when none is found.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
TARGETS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_OPENMP=ON"]
# Native build without AMX: some VMs report AMX in CPUID but do not enable its tile state, and ggml's AMX matmul then
# dies with "Illegal instruction" (tilezero) on Q4_0/Q8_0 weights. Same flags as the Makefile's llama-cpp-python build.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if platform.machine() in ("x86_64", "AMD64"):
    CMAKE_FLAGS += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


def tools_dir() -> Path:
    from admmq_export.paths import cache_dir

    return cache_dir() / "llama-tools"


def binary(name: str) -> Path | None:
    """Path of a built tool (e.g. 'llama-perplexity'), or None when it has not been built."""
    p = tools_dir() / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def find_sdist() -> Path | None:
    from admmq_export.paths import cache_dir

    cands = [os.environ.get("LLAMA_CPP_SDIST"), cache_dir() / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz",
             Path("/tmp/dl") / f"llama_cpp_python-{VERSION}.tar.gz"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def fetch_sdist() -> Path:
    from admmq_export.paths import cache_dir

    d = cache_dir() / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(d),
                    f"llama-cpp-python=={VERSION}"], check=True)
    return d / f"llama_cpp_python-{VERSION}.tar.gz"


def unpack(sdist: Path, dest: Path) -> Path:
    """Extract vendor/llama.cpp of the sdist into dest (once)."""
    if (dest / "CMakeLists.txt").is_file():
        return dest
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                if m.name:
                    members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    tmp.rename(dest)
    return dest


def build(sdist: Path | None = None, jobs: int = 2) -> Path:
    """Configure and build the three targets; copy them into tools_dir()/bin. Returns that folder."""
    root = tools_dir()
    root.mkdir(parents=True, exist_ok=True)
    sdist = sdist or find_sdist() or fetch_sdist()
    src = unpack(sdist, root / "src")
    bld = root / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(bld), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                    *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(bld), "-j", str(jobs), "--target", *TARGETS], check=True)
    out = root / "bin"
    out.mkdir(exist_ok=True)
    for t in TARGETS:
        shutil.copy2(bld / "bin" / t, out / t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp_tools", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "where"])
    ap.add_argument("--sdist", default=None)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.command == "where":
        print(tools_dir() / "bin")
        return 0 if all(binary(t) for t in TARGETS) else 1
    print(build(Path(a.sdist) if a.sdist else None, a.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

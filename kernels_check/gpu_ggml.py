"""ggml's own kernels on GGUF block bytes, through ggml's backend API by ctypes (gpu_kernels.md §5.2).

One code path for both backends: a ggml graph on the CUDA backend (libggml-cuda from the ggml-python 0.0.45
sdist staged by `make gpu-stage`, built on the host with GGML_CUDA=ON GGML_CUDA_FORCE_CUBLAS=ON) or on the
CPU backend (the same build, or the libggml that llama-cpp-python ships).
- CUDA: `GET_ROWS` for the legacy types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 run llama.cpp's `dequantize_*` straight
  to f32, `getrows.cu`); for K-quants CUDA has no get_rows, so `MUL_MAT(w, I_K)` with `ggml_mul_mat_set_prec
  (GGML_PREC_F32)` = `dequantize_row_qX_K_cuda` + cublasSgemm, with NVIDIA_TF32_OVERRIDE=0 (ggml turns TF32 on
  for its handle) and FORCE_CUBLAS (mmq would quantize the identity to q8_1).
- CPU: `GET_ROWS` for every type (ggml-cpu's get_rows calls the type's `to_float`; its MUL_MAT would quantize
  the identity to the type's vec_dot type, so it is not a float path).
Plus `to_float` itself (kernels_check/ggml_ctypes.py). Expect 1-ulp gaps on Q4_1/Q5_1/K-quants under CUDA's
`-use_fast_math` (FMA): that is the runtime, recorded per kernel.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .gpu import KERNELS, BlockTensor, Kernel, cuda_ready

os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # before any cuBLAS handle of this process: fp32 GEMMs stay fp32
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
GGML_TYPE_F32, GGML_TYPE_I32, GGML_PREC_F32 = 0, 26, 10
P = ctypes.c_void_p


class _InitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", P), ("no_alloc", ctypes.c_bool)]


def lib_dirs() -> list[Path]:
    """ggml-python's build first (it may hold libggml-cuda), then llama-cpp-python's CPU libraries."""
    out = []
    for mod in ("ggml", "llama_cpp"):
        spec = importlib.util.find_spec(mod)
        for d in (spec.submodule_search_locations or []) if spec else []:
            if (Path(d) / "lib" / "libggml-base.so").is_file():
                out.append(Path(d) / "lib")
    return out


_SIGS = {  # name: (restype, argtypes)
    "ggml_init": (P, [_InitParams]), "ggml_free": (None, [P]), "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead": (ctypes.c_size_t, []), "ggml_nbytes": (ctypes.c_size_t, [P]),
    "ggml_new_tensor_1d": (P, [P, ctypes.c_int, ctypes.c_int64]),
    "ggml_new_tensor_2d": (P, [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
    "ggml_get_rows": (P, [P, P, P]), "ggml_mul_mat": (P, [P, P, P]), "ggml_mul_mat_set_prec": (None, [P, ctypes.c_int]),
    "ggml_new_graph": (P, [P]), "ggml_build_forward_expand": (None, [P, P]),
    "ggml_backend_alloc_ctx_tensors": (P, [P, P]), "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_tensor_set": (None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_tensor_get": (None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_graph_compute": (ctypes.c_int, [P, P]), "ggml_backend_free": (None, [P]),
}


@lru_cache(maxsize=2)
def _libs(backend: str):
    """(api namespace with the functions above, backend init function) or raises OSError with the reason."""
    for d in lib_dirs():
        name = "libggml-cuda.so" if backend == "cuda" else "libggml-cpu.so"
        if not (d / name).is_file():
            continue
        base = ctypes.CDLL(str(d / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        be = ctypes.CDLL(str(d / name), mode=ctypes.RTLD_GLOBAL)
        api = type("ggml_api", (), {})()
        for fn, (res, args) in _SIGS.items():
            f = getattr(base, fn)
            f.restype, f.argtypes = res, args
            setattr(api, fn, f)
        init = getattr(be, "ggml_backend_cuda_init" if backend == "cuda" else "ggml_backend_cpu_init")
        init.restype, init.argtypes = P, ([ctypes.c_int] if backend == "cuda" else [])
        return api, init, d
    raise OSError(f"no libggml with the {backend} backend found (ggml-python: build .gpu_stage/ggml_python-0.0.45.tar.gz"
                  + (" with CMAKE_ARGS=-DGGML_CUDA=ON" if backend == "cuda" else "; or llama-cpp-python") + ")")


def ready(backend: str) -> str:
    why = cuda_ready() if backend == "cuda" else ""
    if why:
        return why
    try:
        _libs(backend)
    except OSError as e:
        return str(e)
    return ""


def run(t: BlockTensor, backend: str, op: str = "") -> torch.Tensor:
    """The tensor's weight [rows, cols] as ggml's `backend` computes it. `op` forces "get_rows" or "mul_mat"
    (tests drive the CUDA graph's MUL_MAT branch on the CPU backend, where it is not exact: the identity is
    quantized to the type's vec_dot type)."""
    from gguf import GGMLQuantizationType

    api, init, _ = _libs(backend)
    N, K = t.shape
    qtype = int(GGMLQuantizationType[t.ggml_type])
    ctx = api.ggml_init(_InitParams(api.ggml_tensor_overhead() * 8 + api.ggml_graph_overhead(), None, True))
    be = init(0) if backend == "cuda" else init()
    if not be:
        api.ggml_free(ctx)
        raise RuntimeError(f"ggml_backend_{backend}_init failed")
    buf = None
    try:
        w = api.ggml_new_tensor_2d(ctx, qtype, K, N)  # ne0 = K (a row), ne1 = N rows
        via_rows = op == "get_rows" if op else (backend == "cpu" or t.ggml_type in LEGACY)
        if via_rows:
            idx = api.ggml_new_tensor_1d(ctx, GGML_TYPE_I32, N)
            y = api.ggml_get_rows(ctx, w, idx)  # f32, ne0 = K, ne1 = N
        else:
            eye = api.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, K)
            y = api.ggml_mul_mat(ctx, w, eye)  # f32, ne0 = N, ne1 = K: y[k][n] = W[n, k]
            api.ggml_mul_mat_set_prec(y, GGML_PREC_F32)
        gf = api.ggml_new_graph(ctx)
        api.ggml_build_forward_expand(gf, y)
        buf = api.ggml_backend_alloc_ctx_tensors(ctx, be)
        raw = np.ascontiguousarray(t.raw, dtype=np.uint8)
        if raw.nbytes != api.ggml_nbytes(w):
            raise ValueError(f"{raw.nbytes} bytes for a {t.ggml_type} [{N}, {K}] tensor of {api.ggml_nbytes(w)}")
        api.ggml_backend_tensor_set(w, raw.ctypes.data, 0, raw.nbytes)
        second = np.arange(N, dtype=np.int32) if via_rows else np.eye(K, dtype=np.float32)
        api.ggml_backend_tensor_set(idx if via_rows else eye, second.ctypes.data, 0, second.nbytes)
        status = api.ggml_backend_graph_compute(be, gf)
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute returned {status}")
        out = np.empty((N, K) if via_rows else (K, N), np.float32)
        api.ggml_backend_tensor_get(y, out.ctypes.data, 0, out.nbytes)
    finally:
        if buf:
            api.ggml_backend_buffer_free(buf)
        api.ggml_backend_free(be)
        api.ggml_free(ctx)
    return torch.from_numpy(out if via_rows else np.ascontiguousarray(out.T))


def _to_float_ready() -> str:
    from . import ggml_ctypes

    return ggml_ctypes.available()[1]


def _to_float(t: BlockTensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType

    from . import ggml_ctypes

    return torch.from_numpy(ggml_ctypes.dequantize(t.raw, GGMLQuantizationType[t.ggml_type], t.shape))


def _any(t) -> str:
    return ""


KERNELS += [
    Kernel("ggml-cuda GET_ROWS|MUL_MAT(F32) cuda f32", BlockTensor, "cuda", _any, lambda: ready("cuda"),
           lambda t, d: run(t, "cuda"), torch.float32, torch.float32, gemm_probe=lambda t: t.ggml_type not in LEGACY),
    Kernel("ggml-cpu GET_ROWS CPU-kernel f32", BlockTensor, "cpu", _any, lambda: ready("cpu"),
           lambda t, d: run(t, "cpu"), torch.float32, torch.float32),
    Kernel("ggml to_float CPU-kernel f32", BlockTensor, "cpu", _any, _to_float_ready,
           lambda t, d: _to_float(t), torch.float32, torch.float32),
]

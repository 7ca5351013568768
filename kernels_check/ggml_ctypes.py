"""llama.cpp's own dequantization (`ggml_get_type_traits(type)->to_float`) through ctypes on the libggml-base
that llama-cpp-python ships, so the bytes we write are read back by the exact C code llama.cpp runs.

`available()` says whether the library was found (with the reason when not); `dequantize(raw, type, shape)`
returns float32 [rows, cols] from the row bytes of one tensor.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def library_path() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            p = Path(d) / "lib" / name
            if p.is_file():
                return p
    return None


@lru_cache(maxsize=1)
def _lib():
    p = library_path()
    if p is None:
        raise OSError("llama-cpp-python is not installed (pip install 'admmq-export[runtimes]')")
    lib = ctypes.CDLL(str(p))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def available() -> tuple[bool, str]:
    try:
        _lib()
        return True, ""
    except OSError as e:
        return False, str(e)


def traits(qtype: GGMLQuantizationType) -> _Traits:
    t = _lib().ggml_get_type_traits(int(qtype)).contents
    block, size = GGML_QUANT_SIZES[qtype]
    if (t.blck_size, t.type_size) != (block, size):  # guards against a struct layout from another ggml version
        raise RuntimeError(f"libggml's traits for {qtype.name} ({t.blck_size}, {t.type_size}) != gguf-py's ({block}, {size})")
    return t


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    """llama.cpp's to_float over a whole tensor (row bytes, any shape with the right byte count) -> fp32 `shape`."""
    if qtype == GGMLQuantizationType.F32:
        return np.frombuffer(np.ascontiguousarray(raw).tobytes(), np.float32).reshape(shape).copy()
    t = traits(qtype)
    if not t.to_float:
        raise RuntimeError(f"libggml has no to_float for {qtype.name}")
    src = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n = int(np.prod(shape))
    if src.size != n // t.blck_size * t.type_size:
        raise ValueError(f"{src.size} bytes do not hold {n} {qtype.name} values")
    out = np.empty(n, np.float32)
    _TO_FLOAT(t.to_float)(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out.reshape(shape)


def quantize(values: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own quantizer (`ggml_quantize_chunk`, what llama-quantize runs; `imatrix` [cols] its importance
    weights) on fp32 [rows, cols] -> the tensor's row bytes (uint8)."""
    lib = _lib()
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    x = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros(rows * cols // block * size, np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    fl = ctypes.POINTER(ctypes.c_float)
    n = fn(int(qtype), x.ctypes.data_as(fl), out.ctypes.data, 0, rows, cols, None if im is None else im.ctypes.data_as(fl))
    if n != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes for {qtype.name}, expected {out.size}")
    return out

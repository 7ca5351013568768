"""GPTQModel's TritonV2 dequant kernel (`gptqmodel/nn_modules/triton_utils/dequant.py`, staged from the 7.7.0
sdist by `make gpu-stage`; gpu_kernels.md §5.1 check D): returns W [K, N] = out_dtype((float(q) − float(z))·s)
from GPTQ v2 tensors (zeros stored as is), any zero point, with g_idx — the check for asym and act-order.
Bits 2/3/4/8; 3-bit uses GPTQ's 10-1-10-1-10 three-word packing (our gptq_pack stream layout) and needs
out_features % 32 == 0 (a `tl.static_assert` in the kernel). The vendored file imports `HAS_XPU` from GPTQModel; it is
loaded with that one line replaced by `HAS_XPU = False`. Under `TRITON_INTERPRET=1` the same kernel runs on CPU
through Triton's interpreter (launched directly: the file's launcher enters a `torch.cuda.device`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from functools import lru_cache

import torch

from .gpu import KERNELS, STAGE, IntTensor, Kernel, cuda_ready

SRC = STAGE / "gptqmodel-7.7.0" / "gptqmodel" / "nn_modules" / "triton_utils" / "dequant.py"
XPU_IMPORT = "from ...utils.torch import HAS_XPU"


def fits(t: IntTensor) -> str:
    N, K = t.shape
    if t.bits not in (2, 3, 4, 8):
        return f"TritonV2 dequant holds 2/3/4/8-bit codes, not {t.bits}-bit"
    if t.bits == 3 and (N % 32 or K % 32):
        return f"shape [{N}, {K}]: 3-bit TritonV2 needs out-dim and in-dim % 32 == 0 (three words per 32 values)"
    if (N * t.bits) % 32 or (K * t.bits) % 32:
        return f"shape [{N}, {K}] does not fill whole int32 words at {t.bits} bits"
    return ""


def ready(interpret: bool) -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not SRC.is_file():
        return f"TritonV2 dequant not staged ({SRC}; run `make gpu-stage`)"
    if interpret:
        return "" if os.environ.get("TRITON_INTERPRET") == "1" else "set TRITON_INTERPRET=1 to run Triton's CPU interpreter"
    return cuda_ready()


@lru_cache(maxsize=1)
def _module():
    text = SRC.read_text()
    if XPU_IMPORT not in text:
        raise RuntimeError(f"{SRC}: expected `{XPU_IMPORT}` (another GPTQModel version?)")
    mod = types.ModuleType("gptqmodel_tritonv2_dequant")
    mod.__file__ = str(SRC)  # Triton's JIT reads the kernel's source from its file
    sys.modules[mod.__name__] = mod
    exec(compile(text.replace(XPU_IMPORT, "HAS_XPU = False"), str(SRC), "exec"), mod.__dict__)
    return mod


def _inputs(t: IntTensor, device: str):
    from converters.gptq_pack import pack_cols, pack_rows

    qweight = torch.from_numpy(pack_rows(t.codes.T.numpy(), t.bits)).to(device)
    qzeros = torch.from_numpy(pack_cols(t.zeros.T.numpy(), t.bits)).to(device)  # v2: z as stored
    return qweight, t.scales.T.contiguous().to(device), qzeros, t.g_idx.int().contiguous().to(device)


def run(t: IntTensor, device: str, interpret: bool) -> torch.Tensor:
    m = _module()
    qweight, scales, qzeros, g_idx = _inputs(t, "cpu" if interpret else device)
    maxq = 2**t.bits - 1
    if not interpret:
        return m.dequant(torch.float16, qweight, scales, qzeros, g_idx, t.bits, 32, maxq).t()
    import triton

    out = torch.empty(t.shape[1], t.shape[0], dtype=torch.float16)
    grid = (triton.cdiv(out.numel(), m.DEQUANT_X_BLOCK),)
    m.dequant_kernel[grid](g_idx, scales, qweight, qzeros, out, m.torch_dtype_to_triton(torch.float16), out.numel(),
                           pack_bits=32, maxq=maxq, bits=t.bits, out_features=t.shape[0], num_groups=scales.shape[0],
                           X_BLOCK=m.DEQUANT_X_BLOCK, num_warps=m.DEQUANT_NUM_WARPS, num_stages=m.DEQUANT_NUM_STAGES)
    return out.t()


KERNELS += [
    Kernel("gptqmodel TritonV2 dequant cuda fp16", IntTensor, "cuda", fits, lambda: ready(False),
           lambda t, d: run(t, d, False)),
    Kernel("gptqmodel TritonV2 dequant TRITON_INTERPRET CPU fp16", IntTensor, "cpu", fits, lambda: ready(True),
           lambda t, d: run(t, "cpu", True)),
]

"""Marlin (`gptq_marlin_gemm`, the kernel vLLM / SGLang / GPTQModel serve GPTQ files with), JIT-built from the
GPTQModel 7.7.0 sources staged by `make gpu-stage`, probed with the identity (gpu_kernels.md §5.1 check B).

Holds sym uint4b8 / uint8b128: w = dt((q − 2^(b−1))·s), groups −1/32/64/128, act-order via sorted g_idx + perm;
shapes need N % 64 == 0 and K % 128 == 0 [R]. The fp16 build reproduces the GPTQ fp16 weight; the bf16 build
casts the fp16 scales to bf16. One build per dtype and process (`load` caches under TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import glob
import importlib.util
from functools import lru_cache

import torch

from .gpu import KERNELS, STAGE, IntTensor, Kernel, cuda_ready

SRC = STAGE / "gptqmodel-7.7.0" / "gptqmodel_ext" / "marlin"
SCALAR_TYPES = STAGE / "gptqmodel-7.7.0" / "gptqmodel" / "utils" / "marlin_scalar_type.py"
GROUPS = (0, 32, 64, 128)


def fits(t: IntTensor) -> str:
    N, K = t.shape
    if t.bits not in (4, 8):
        return f"Marlin holds 4/8-bit codes, not {t.bits}-bit"
    if not t.sym:
        return "asymmetric zero points: GPTQ Marlin holds uint4b8/uint8b128 only (zero = 2^(b-1))"
    if t.group_size not in GROUPS:
        return f"group {t.group_size} not in Marlin's -1/32/64/128"
    if K % 128 or N % 64:
        return f"shape [{N}, {K}]: Marlin needs out-dim % 64 == 0 and in-dim % 128 == 0"
    return ""


def ready(dt: str) -> str:
    why = cuda_ready()
    if why:
        return why
    if not glob.glob(str(SRC / f"kernel_{dt}_*.cu")) or not SCALAR_TYPES.is_file():
        return f"Marlin sources not staged in {SRC} (run `make gpu-stage` with network, copy .gpu_stage/)"
    return ""


@lru_cache(maxsize=2)
def _ops(dt: str):
    from torch.utils.cpp_extension import load

    srcs = [SRC / f"marlin_torch_{dt}.cpp", SRC / f"gptq_marlin_{dt}.cu", SRC / "gptq_marlin_repack.cu",
            SRC / "awq_marlin_repack.cu", *sorted(SRC.glob(f"kernel_{dt}_*.cu"))]
    flags = ["-O3", "-std=c++17", "-DENABLE_BF16"]
    load(f"gptqmodel_marlin_{dt}_ops", [str(s) for s in srcs if s.is_file()], extra_include_paths=[str(SRC)],
         is_python_module=False, extra_cflags=flags,
         extra_cuda_cflags=["-static-global-template-stub=false", *flags, "--threads", "8"])
    return getattr(torch.ops, f"gptqmodel_marlin_{dt}")


@lru_cache(maxsize=1)
def _scalar_types():
    spec = importlib.util.spec_from_file_location("marlin_scalar_type", SCALAR_TYPES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib imports only
    return mod.scalar_types


def permute_scales(s: torch.Tensor, size_k: int, size_n: int, group_size: int) -> torch.Tensor:
    """Marlin's scale layout (vLLM `marlin_permute_scales` / `get_scale_perms`)."""
    perm = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    p = perm if 0 < group_size < size_k else single
    return s.reshape(-1, len(p))[:, p].reshape(-1, size_n).contiguous()


def run(t: IntTensor, device: str, dt: str) -> torch.Tensor:
    from converters.gptq_pack import pack_rows

    ops = _ops(dt)
    tdt = torch.float16 if dt == "fp16" else torch.bfloat16
    N, K = t.shape
    qweight = torch.from_numpy(pack_rows(t.codes.T.numpy(), t.bits)).to(device)  # GPTQ [K·b/32, N]
    e = torch.empty(0, dtype=torch.int, device=device)
    g_idx, perm = e, e
    if t.act_order:
        perm = torch.argsort(t.g_idx.long()).to(torch.int).to(device)
        g_idx = t.g_idx.to(device)[perm.long()].contiguous()
    mq = ops.gptq_marlin_repack(qweight, perm, K, N, t.bits)
    ms = permute_scales(t.scales.T.contiguous().to(tdt).to(device), K, N, t.group_size or -1)
    ws = torch.zeros(max(torch.cuda.get_device_properties(device).multi_processor_count, 128), dtype=torch.int, device=device)
    st = _scalar_types()
    tid = (st.uint4b8 if t.bits == 4 else st.uint8b128).id
    gemm = getattr(ops, f"gptq_marlin_gemm_{dt}")
    Wt = gemm(torch.eye(K, dtype=tdt, device=device), None, mq, None, ms, None, None, g_idx, perm, ws, tid,
              K, N, K, True, False, True, False)
    return Wt.t()


for _dt, _t in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    KERNELS.append(Kernel(f"marlin gptq_marlin_gemm cuda {_dt}", IntTensor, "cuda", fits,
                          lambda dt=_dt: ready(dt), lambda t, d, dt=_dt: run(t, d, dt), _t, _t,
                          gemm_probe=lambda t: True))

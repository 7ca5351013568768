"""GPTQ checkpoints against their IR. An independent reader of the written safetensors (shards and index, v1 and
v2 zero points, any bit width) dequantizes every linear as all GPTQ kernels do, `W[k, n] = fp16(s[g_idx[k], n] ·
(q[k, n] − z[g_idx[k], n]))` (formats.md §2.1, §0), and compares with the IR's weight bit for bit; plain tensors
must equal the IR's value in fp16. v1 zero fields are read the AutoGPTQ way, ((field + 1) & maxq).
Where GPTQModel and optimum are installed, the folder is also loaded by transformers itself and each of its
quantized modules' dequantized weight is compared the same way (transformers_rows)."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from converters.gptq_pack import unpack_cols, unpack_rows

from . import compare, register


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    idx = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.is_file() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(path / f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def dequant_linear(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> torch.Tensor:
    """fp16 weight [N, K] from the GPTQ tensors."""
    q = torch.from_numpy(unpack_rows(qweight.numpy(), bits).astype(np.int64))  # [K, N]
    z = torch.from_numpy(unpack_cols(qzeros.numpy(), bits).astype(np.int64))[:, : scales.shape[1]]  # [G, N]
    if v1:
        z = (z + 1) & ((1 << bits) - 1)
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g]).float()  # exact in fp32, then the kernels' single rounding to fp16
    return w.to(torch.float16).T.contiguous()


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({linear weight name: fp16 weight}, {plain tensor name: tensor}) of a GPTQ checkpoint folder."""
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    bits = int(cfg["bits"])
    v1 = cfg.get("checkpoint_format", cfg.get("format", "gptq")) == "gptq"
    t = _tensors(path)
    weights = {}
    for k in [k for k in t if k.endswith(".qweight")]:
        p = k[: -len(".qweight")]
        weights[f"{p}.weight"] = dequant_linear(t.pop(k), t.pop(f"{p}.qzeros"), t.pop(f"{p}.scales"), t.pop(f"{p}.g_idx"), bits, v1)
    return weights, t


def load_with_transformers(path: Path):
    """The folder loaded by transformers' own GPTQ path (optimum + GPTQModel), on CPU with GPTQModel's torch kernel
    (TorchLinear: dequantize `scales[g_idx] * (q - zeros[g_idx])` in fp16, then matmul). Its default CPU kernel,
    TorchAtenLinear, casts the scales to bf16 (`_weight_int4pack_mm_for_cpu`), so it is not the fp16 grid."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = int(json.loads((Path(path) / "config.json").read_text())["quantization_config"]["bits"])
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel logs to stdout, which `check --json` owns
        return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float16,
                                                    quantization_config=GPTQConfig(bits=bits, backend="gptq_torch")).eval()


def transformers_rows(path: Path, ir) -> list[dict]:
    """Each linear as transformers + GPTQModel dequantize it, against the IR; one 'unavailable' row without them."""
    import importlib.util

    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        return [{"tensor": "*", "checker": "transformers+gptqmodel", "status": "unavailable", "exact": False,
                 "n_diff": None, "max_ulp": None, "reason": f"{', '.join(missing)} not installed (GPTQModel's wheel "
                 "pins the newest CUDA torch; install it with --no-deps to run this check)"}]
    model = load_with_transformers(path)
    return [compare(name, "transformers+gptqmodel", model.get_submodule(name[: -len(".weight")]).dequantize_weight().T,
                    ql.dequant()) for name, ql in sorted(ir.linears.items())]


def check(path: Path, ir) -> list[dict]:
    weights, plain = read_checkpoint(Path(path))
    rows = transformers_rows(Path(path), ir)
    for name, ql in sorted(ir.linears.items()):
        if name not in weights:
            rows.append({"tensor": name, "checker": "gptq-unpack", "status": "differs", "exact": False, "n_diff": -1,
                         "max_ulp": None, "reason": "missing from the checkpoint"})
            continue
        rows.append(compare(name, "gptq-unpack fp16", weights[name], ql.dequant()))
    for name, v in sorted(ir.tensors.items()):
        if name not in plain:
            rows.append({"tensor": name, "checker": "plain fp16", "status": "differs", "exact": False, "n_diff": -1,
                         "max_ulp": None, "reason": "missing from the checkpoint"})
            continue
        rows.append(compare(name, "plain fp16", plain[name].to(torch.float16), v.to(torch.float16)))
    return rows


def detect(path: Path) -> bool:
    from converters.gptq import is_gptq_dir

    return Path(path).is_dir() and is_gptq_dir(Path(path))


register(detect, check)

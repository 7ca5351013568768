"""Which GPTQ kernels can run a quantized linear: one declarative table (formats.md §2.4, GPTQModel's and vLLM's
kernel validators) and a per-layer pre-flight with the reason and a fix when a kernel refuses.

Tensor parallelism (`tp`): column-parallel layers (q/k/v/gate/up) split N, row-parallel layers (o/down) split K;
the divisibility rules apply to each shard."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    name: str
    bits: tuple[int, ...]
    sym_only: bool
    groups: tuple[int, ...] | None  # None: any group size that divides K
    k_mult: int  # K (per shard) must be a multiple of this
    n_mult: int  # N (per shard) must be a multiple of this
    act_order: bool
    where: str


KERNELS = [
    Kernel("marlin", (4, 8), True, (-1, 32, 64, 128), 128, 64, True, "vLLM/SGLang gptq_marlin, GPTQModel MarlinQuantLinear (CUDA sm75+)"),
    Kernel("exllama_v2", (4,), False, None, 32, 32, True, "GPTQModel/AutoGPTQ ExllamaV2QuantLinear (CUDA)"),
    Kernel("exllama_v1", (4,), False, None, 32, 32, True, "AutoGPTQ/GPTQModel ExllamaQuantLinear (CUDA)"),
    Kernel("triton", (2, 4, 8), False, None, 32, 32, True, "GPTQModel TritonV2QuantLinear (CUDA, Triton)"),
    Kernel("torch", (2, 3, 4, 8), False, None, 1, 1, True, "GPTQModel TorchQuantLinear (CPU/CUDA dequant + matmul)"),
]

ROW_PARALLEL = ("o_proj", "down_proj")


def shard_dims(name: str, out_f: int, in_f: int, tp: int) -> tuple[int, int, bool]:
    """(K, N, row_parallel) of one tensor-parallel shard."""
    row_par = any(name.endswith(f"{p}.weight") or name.endswith(p) for p in ROW_PARALLEL)
    return (in_f // tp if row_par else in_f), (out_f if row_par else out_f // tp), row_par


def can_run(k: Kernel, out_f: int, in_f: int, bits: int, group: int, sym: bool, act_order: bool, tp: int = 1,
            name: str = "") -> tuple[bool, str]:
    """(ok, reason-if-not) for one layer [out_f, in_f]."""
    K, N, row_par = shard_dims(name, out_f, in_f, tp)
    if bits not in k.bits:
        return False, f"{bits}-bit not supported (bits {'/'.join(map(str, k.bits))})"
    if k.sym_only and not sym:
        return False, "needs symmetric codes (zero points are ignored)"
    g = -1 if group in (0, -1) else group
    if k.groups is not None and g not in k.groups:
        return False, f"group size {g} not in {k.groups}"
    if g != -1 and K % g:
        return False, f"K {K} not divisible by group {g}"
    if K % k.k_mult:
        return False, f"in-dim {K}{' per shard' if row_par and tp > 1 else ''} not divisible by {k.k_mult}"
    if N % k.n_mult:
        return False, f"out-dim {N}{' per shard' if not row_par and tp > 1 else ''} not divisible by {k.n_mult}"
    if act_order and not k.act_order:
        return False, "no act-order (g_idx) support"
    return True, ""


def preflight(name: str, shape: tuple, bits: int, group: int, sym: bool, act_order: bool, tp: int = 1) -> dict:
    out_f, in_f = shape
    res = {k.name: can_run(k, out_f, in_f, bits, group, sym, act_order, tp, name) for k in KERNELS}
    ok = [n for n, (good, _) in res.items() if good]
    K, _, _ = shard_dims(name, out_f, in_f, tp)
    fits = [g for g in (128, 64, 32) if K % g == 0] + [-1]
    fix = ""
    if not ok:
        why = res["torch"][1]
        if "group" in why:
            fix = (f"use --group-size {fits[0]} (divides the in-dim {K}{' of each shard' if tp > 1 else ''})"
                   + (" or a smaller --tp" if tp > 1 else ""))
        else:
            fix = f"{why}: use a --tp that divides the layer's dims" if tp > 1 else why
    elif "marlin" not in ok:
        why = res["marlin"][1]
        if "symmetric" in why:
            fix = "for Marlin use --sym (or --to marlin)"
        elif "bit" in why:
            fix = "for Marlin use --bits 4 or 8"
        elif "group" in why and K % 128 == 0:
            fix = f"for Marlin use --group-size {fits[0]}"
        else:
            fix = "Marlin cannot run this shape; serve with exllama/triton/torch kernels, or a model whose dims divide 128/64"
    return {"tensor": name, "shape": list(shape), "kernels": ok,
            "refused": {n: why for n, (good, why) in res.items() if not good}, "fix": fix}


def format_preflight(rows: list[dict]) -> str:
    lines = [f"{'tensor':55s} {'shape':>12s}  kernels"]
    for r in rows:
        who = "no kernel" if not r["kernels"] else "marlin"
        why = r["refused"]["torch" if not r["kernels"] else "marlin"] if "marlin" in r["refused"] else ""
        lines.append(f"{r['tensor'][:55]:55s} {'x'.join(map(str, r['shape'])):>12s}  {', '.join(r['kernels']) or 'NONE'}"
                     + (f"   ({who}: {why}; {r['fix']})" if why else ""))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    n = len(rows)
    marlin = sum("marlin" in r["kernels"] for r in rows)
    none = [r["tensor"] for r in rows if not r["kernels"]]
    s = f"Marlin can run {marlin}/{n} quantized layers"
    if marlin < n:
        first = next(r for r in rows if "marlin" not in r["kernels"])
        s += f" (e.g. {first['tensor']}: {first['refused']['marlin']}; {first['fix']})"
    if none:
        first = next(r for r in rows if not r["kernels"])
        s += f"; NO kernel for {len(none)} layers (e.g. {first['tensor']}: {first['refused']['torch']}; {first['fix']})"
    return s

"""`admmq-export check OUT --gpu`: every quantized tensor through each real inference kernel that can hold its
grid, compared bit for bit with the IR's weight in that kernel's arithmetic (../shared/docs/gpu_kernels.md).

A kernel sees a weight in one of two forms, built from the IR (`tensors_from_ir`) or read back from the written
file (`tensors_from_file`, the adapter to the converters' own unpackers):
- `IntTensor`: what a GPTQ/Marlin checkpoint stores — codes q [N, K], fp16 scales s and integer zeros z
  [N, G], g_idx [K]. Its weight in a kernel whose scales have dtype `sdt` and output dtype `odt` is
  `odt((q − z)·sdt(s))` (fp32 product exact, one rounding; formats.md §0).
- `BlockTensor`: the GGUF block bytes of one tensor [rows, row_bytes]; its weight is the IR's fp32 value.
Reading the kernel's weight: the identity-matrix probe (`A = I_K`, out = Wᵀ; gpu_kernels.md §1) for fused GEMMs,
or the kernel's own dequantizer (TritonV2 `dequant`, ggml `GET_ROWS`).

`KERNELS` is the declarative table: name, device, `fits(t) -> ''|reason` (representability, gpu_kernels.md §3,
§5), `ready() -> ''|reason` (built/staged/CUDA present), `run(t, device) -> weight [N, K]`, and the dtypes of
its arithmetic. Rows: {tensor, kernel, status exact|differs|not representable|unavailable, n_diff, max_ulp, reason, source
file|ir}; a kernel that raises on a tensor it should hold counts as `differs` (n_diff −1, the error as reason).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import bits, compare

STAGE = Path(__file__).resolve().parent.parent / ".gpu_stage"


@dataclass
class IntTensor:
    name: str
    bits: int
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # fp16 [N, G]
    zeros: torch.Tensor  # uint8 [N, G]
    g_idx: torch.Tensor  # int32 [K]
    group_size: int  # 0: per channel
    act_order: bool  # g_idx is not column // group
    ref: "IntTensor | None" = None  # the IR's own fields when this one was read from a file

    @property
    def shape(self):
        return tuple(self.codes.shape)

    @property
    def sym(self) -> bool:
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    def want(self, sdt: torch.dtype, odt: torch.dtype) -> torch.Tensor:
        """The IR's weight in a kernel's arithmetic: odt((q − z)·sdt(s)), per column's group."""
        r = self.ref or self
        g = r.g_idx.long()
        s = r.scales.to(sdt).float()[:, g]
        return ((r.codes.float() - r.zeros.float()[:, g]) * s).to(odt)

    def scale_note(self, sdt: torch.dtype) -> str:
        r = self.ref or self
        if sdt == torch.float16:
            return ""
        n = int((r.scales.to(sdt).float() != r.scales.float()).sum())
        return f"scales fp16->{str(sdt).split('.')[1]}: {n}/{r.scales.numel()} change value" if n else ""


@dataclass
class BlockTensor:
    name: str
    ggml_type: str
    raw: np.ndarray  # uint8 [rows, row_bytes], ggml's block layout
    shape: tuple  # (rows, cols)
    target: torch.Tensor  # fp32 [rows, cols]: the IR's weight (file layout)


def _int_tensor(name: str, ql) -> IntTensor:
    rows, cols = ql.shape
    g_idx = ql.g_idx_or_default()
    default = (torch.arange(cols) // ql.grid.unit(cols)).int()
    return IntTensor(name, ql.grid.bits, ql.codes, ql.params["scale"][..., 0].to(torch.float16),
                     ql.params["zero"][..., 0].to(torch.uint8), g_idx, ql.grid.group_size,
                     not torch.equal(g_idx, default))


def tensors_from_ir(ir) -> list:
    """One IntTensor / BlockTensor per quantized linear of the IR (GGUF bytes from converters.gguf_pack)."""
    out = []
    for name, ql in sorted(ir.linears.items()):
        if ql.grid.family == "gguf":
            from converters.gguf_pack import pack

            t = ql.grid.ggml_type
            out.append(BlockTensor(name, t, pack(t, ql.codes, ql.params), ql.shape, ql.dequant().float()))
        elif set(ql.params) >= {"scale", "zero"}:
            out.append(_int_tensor(name, ql))
    return out


def tensors_from_file(path: Path, ir) -> list | None:
    """The written file's own tensors, or None when no adapter knows its format (then the IR's are used).
    GPTQ folders: qweight/qzeros/scales/g_idx unpacked by converters.gptq_pack (v1 zeros +1);
    GGUF files: raw blocks from gguf-py's reader, targets in the file's layout (kernels_check.gguf)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGMLQuantizationType, GGUFReader

        from .gguf import _ir_values

        want = _ir_values(ir)
        out = []
        for t in GGUFReader(str(path)).tensors:
            qt = GGMLQuantizationType(int(t.tensor_type)).name
            if qt in ("F32", "F16", "BF16") or t.name not in want:
                continue
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            raw = np.asarray(t.data).view(np.uint8).reshape(shape[0], -1)
            out.append(BlockTensor(t.name, qt, raw, shape, want[t.name][0].reshape(shape).float()))
        return out
    try:
        from converters.gptq import is_gptq_dir
    except ImportError:
        return None
    if path.is_dir() and is_gptq_dir(path):
        return _gptq_tensors(path, ir)
    return None


def _gptq_tensors(path: Path, ir) -> list:
    import json

    from converters.gptq_pack import unpack_cols, unpack_rows

    from .gptq import _tensors

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    bits = int(cfg["bits"])
    v1 = cfg.get("checkpoint_format", cfg.get("format", "gptq")) == "gptq"
    t = _tensors(path)
    out = []
    for name, ql in sorted(ir.linears.items()):
        p = name[: -len(".weight")]
        if f"{p}.qweight" not in t or ql.grid.family == "gguf":
            continue
        ref = _int_tensor(name, ql)
        scales = t[f"{p}.scales"].to(torch.float16)  # [G, N]
        q = torch.from_numpy(unpack_rows(t[f"{p}.qweight"].numpy(), bits)).T.contiguous()
        z = torch.from_numpy(unpack_cols(t[f"{p}.qzeros"].numpy(), bits))[:, : scales.shape[1]]
        if v1:
            z = (z.int() + 1) & ((1 << bits) - 1)
        g_idx = t[f"{p}.g_idx"].int()
        out.append(dataclasses.replace(ref, codes=q.to(torch.uint8), scales=scales.T.contiguous(),
                                       zeros=z.T.to(torch.uint8).contiguous(), g_idx=g_idx, ref=ref))
    return out


@dataclass(frozen=True)
class Kernel:
    name: str
    form: type  # IntTensor or BlockTensor
    device: str  # cuda | cpu
    fits: Callable  # tensor -> '' | reason it cannot be represented
    ready: Callable  # () -> '' | reason it cannot run here
    run: Callable  # (tensor, device) -> weight [N, K] as the kernel computes it
    sdt: torch.dtype = torch.float16  # scale dtype (IntTensor kernels)
    odt: torch.dtype = torch.float16  # output dtype
    gemm_probe: Callable | None = None  # tensor -> True when its weight is read through an identity GEMM


SIGNED_ZERO = "exact up to -0"  # status: every differing element is an IR -0 read back as +0 through a GEMM probe


def zero_sign_only(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements whose bits differ, when every one of them is a zero of the other sign (else 0)."""
    got = got.to(want.dtype)
    bad = bits(got) != bits(want)
    if not bool(bad.any()):
        return 0
    return int(bad.sum()) if bool(((got == 0) & (want == 0))[bad].all()) else 0


KERNELS: list[Kernel] = []
_FAMILIES = ("gpu_torch", "gpu_marlin", "gpu_triton", "gpu_ggml")


def kernels() -> list[Kernel]:
    if not KERNELS:
        for m in _FAMILIES:
            importlib.import_module(f"{__package__}.{m}")
    return KERNELS


def cuda_ready() -> str:
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return ""


def _row(tensor, kernel, status, reason="", n_diff=None, max_ulp=None) -> dict:
    return {"tensor": tensor, "kernel": kernel, "checker": kernel, "status": status, "exact": status == "exact",
            "n_diff": n_diff, "max_ulp": max_ulp, "reason": reason}


def check_one(t, k: Kernel, device: str) -> dict:
    why = k.fits(t)
    if why:
        return _row(t.name, k.name, "not representable", why)
    why = k.ready()
    if why:
        return _row(t.name, k.name, "unavailable", why)
    try:
        got = k.run(t, device if k.device == "cuda" else "cpu").cpu()
    except Exception as e:  # noqa: BLE001 - a kernel that should hold the grid and fails is a failed check
        return _row(t.name, k.name, "differs", f"kernel raised {type(e).__name__}: {str(e)[:200]}", -1)
    want = t.target if isinstance(t, BlockTensor) else t.want(k.sdt, k.odt)
    r = compare(t.name, k.name, got.float() if isinstance(t, BlockTensor) else got, want)
    if isinstance(t, IntTensor):
        note = t.scale_note(k.sdt)
        r["reason"] = "; ".join(x for x in (r["reason"], note) if x)
    if r["status"] == "differs" and k.gemm_probe is not None and k.gemm_probe(t):
        n0 = zero_sign_only(got, want)
        if n0:  # -0·1 + (+0) = +0: the identity GEMM cannot return a -0, whatever the kernel dequantized
            r.update(status=SIGNED_ZERO, exact=True, reason=f"all {n0} differing elements are -0 in the IR and +0 "
                     "from the identity-GEMM probe (-0*1 summed with +0 products is +0); every value is equal")
    return {**r, "kernel": k.name}


def check_gpu(ir, device: str = "cuda", path: Path | None = None, only: str | None = None) -> list[dict]:
    """Rows for every (quantized tensor, kernel of its form). `path`: read the tensors from the written file."""
    ts = tensors_from_file(path, ir) if path is not None else None
    source = "file" if ts is not None else "ir"
    if ts is None:
        ts = tensors_from_ir(ir)
    rows = []
    for t in ts:
        for k in kernels():
            if isinstance(t, k.form) and (only is None or only in k.name):
                rows.append({**check_one(t, k, device), "source": source})
    return rows


def ok(rows: list[dict]) -> bool:
    return all(r["exact"] for r in rows if r["status"] not in ("not representable", "unavailable"))


def format_rows(rows: list[dict]) -> str:
    w = max([len(r["kernel"]) for r in rows] + [6])
    out = [f"{'tensor':44s} {'kernel':{w}s} {'status':17s} {'n_diff':>7s} {'max_ulp':>7s}  reason"]
    for r in rows:
        out.append(f"{r['tensor'][-44:]:44s} {r['kernel']:{w}s} {r['status']:17s} {str(r['n_diff']):>7s} "
                   f"{str(r['max_ulp']):>7s}  {r['reason']}")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault(r["kernel"], {}).setdefault(r["status"], 0)
        by[r["kernel"]][r["status"]] += 1
    return "\n".join(f"{k}: " + ", ".join(f"{n} {s}" for s, n in sorted(v.items())) for k, v in by.items())


def cmd_gpu(output: str, as_json: bool) -> int:
    """`admmq-export check OUT --gpu`: exit 0 only when every representable, available pair is exact."""
    import json

    from admmq_export.errors import UserError
    from admmq_export.fakequant import ir_path_for, is_ir_dir
    from admmq_export.ir import QuantizedModel

    p = Path(output)
    if not p.exists():
        raise UserError(f"{p} does not exist", "pass a file written by admmq-export")
    ir_dir = p if is_ir_dir(p) else ir_path_for(p)
    if not is_ir_dir(ir_dir):
        raise UserError(f"no IR found for {p} (expected {ir_dir})", "check outputs written by admmq-export, next to their .ir folder")
    ir = QuantizedModel.load(ir_dir)
    rows = check_gpu(ir, "cuda", None if is_ir_dir(p) else p)
    good = ok(rows)
    ran = sorted({r["kernel"] for r in rows if r["status"] in ("exact", SIGNED_ZERO, "differs")})
    if as_json:
        print(json.dumps({"ok": good, "kernels_run": ran, "cuda": cuda_ready() or torch.cuda.get_device_name(0),
                          "tensors": rows}, indent=1))
    else:
        print(format_rows(rows))
        print(summary(rows))
        if not any("cuda" in k for k in ran):
            print(f"note: no CUDA kernel ran ({cuda_ready() or 'none available'}); only CPU kernels were checked")
        print("all representable pairs exact" if good else "MISMATCH: some kernel differs from the IR")
    return 0 if good else 1

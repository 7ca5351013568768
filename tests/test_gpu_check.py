"""`admmq-export check OUT --gpu` (kernels_check/gpu.py) and `make gpu-stage --dry-run`: on a machine without
CUDA the CPU kernels (torch int4/int8 CPU ops, ggml-cpu GET_ROWS and to_float) run for real and must be exact;
CUDA kernels report 'unavailable', unfit grids 'not representable', each with its reason."""
import json
import subprocess
import sys

import pytest
import torch

from admmq_export.cli import main
from admmq_export.grids import int_grid
from admmq_export.ir import QuantizedLinear, QuantizedModel
from kernels_check import gpu
from tests.conftest import ROOT, STORIES, export_args

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU kernels run only on a CUDA host")
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason=f"shared model missing: {STORIES}")


def _by(rows, kernel):
    return [r for r in rows if r["kernel"] == kernel]


def test_stage_dry_run_offline():
    r = subprocess.run([sys.executable, "-m", "kernels_check.gpu_stage", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1"})
    assert r.returncode == 0, r.stderr
    for spec in ("gptqmodel==7.7.0", "ggml-python==0.0.45", "gemlite==", "gguf==0.19.0"):
        assert spec in r.stdout
    assert "within" in r.stdout and "60 MB budget" in r.stdout
    assert ".gpu_stage/" in (ROOT / ".gitignore").read_text()


@needs_stories
def test_sym4_ir_cpu_kernels_exact(tmp_path):
    out = tmp_path / "s4.ir"
    assert main(export_args(out, "--sym", bits=4, group=32)) == 0
    rows = gpu.check_gpu(QuantizedModel.load(out))
    cpu16 = _by(rows, "torch _weight_int4pack_mm_for_cpu CPU-kernel fp16")
    assert [r for r in cpu16 if r["status"] == "exact"], cpu16
    assert all(r["status"] in ("exact", "not representable") for r in cpu16)
    assert all(r["reason"] for r in rows if r["status"] in ("not representable", "unavailable"))
    marlin = _by(rows, "marlin gptq_marlin_gemm cuda fp16")
    assert marlin and all(r["status"] == "not representable" and "% 128" in r["reason"] for r in marlin)
    if not CUDA:
        assert {r["status"] for r in _by(rows, "torch _weight_int4pack_mm cuda bf16")} <= {"unavailable", "not representable"}
        assert any("no CUDA" in r["reason"] for r in rows)
    assert gpu.ok(rows)


@needs_stories
def test_asym4_not_representable_in_tinygemm(tmp_path, capsys):
    out = tmp_path / "a4.ir"
    assert main(export_args(out, "--asym", bits=4, group=32)) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--gpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    tg = [r for r in doc["tensors"] if "int4pack" in r["kernel"]]
    assert tg and all(r["status"] == "not representable" for r in tg)
    assert any("asymmetric" in r["reason"] for r in tg)


@needs_stories
def test_gptq8_file_int8pack_cpu_exact(tmp_path, capsys):
    out = tmp_path / "g8"
    assert main(export_args(out, "--sym", "--fallback", "keep", to="gptq", bits=8, group=-1)) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--gpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = _by(doc["tensors"], "torch _weight_int8pack_mm CPU-kernel bf16")
    assert sum(r["status"] == "exact" for r in rows) >= 20  # attention + gate/up; down (in-dim 172) is refused
    assert doc["ok"]


@needs_stories
def test_gguf_file_ggml_cpu_exact(tmp_path, capsys):
    from kernels_check import ggml_ctypes, gpu_ggml

    if gpu_ggml.ready("cpu") or not ggml_ctypes.available()[0]:
        pytest.skip(f"no libggml CPU backend: {gpu_ggml.ready('cpu') or ggml_ctypes.available()[1]}")
    out = tmp_path / "s.gguf"
    assert main(export_args(out, "--fallback", "keep", to="gguf:Q4_1")) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--gpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    for k in ("ggml-cpu GET_ROWS CPU-kernel f32", "ggml to_float CPU-kernel f32"):
        assert _by(rows, k) and all(r["status"] == "exact" for r in _by(rows, k))


def _marlin_model(act_order: bool, bits: int = 4, group: int = 128) -> QuantizedModel:
    """One Marlin-shaped linear [256, 512] (N % 64, K % 128), optionally with a shuffled act-order g_idx."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g)
    grid = int_grid("marlin", bits, group, True)
    g_idx = None
    if act_order:
        perm = torch.randperm(512, generator=g)
        g_idx = torch.empty(512, dtype=torch.int32)
        g_idx[perm] = (torch.arange(512) // group).int()
    params = grid.fit(W) if g_idx is None else grid.fit(W[:, torch.argsort(g_idx.long(), stable=True)])
    ql = QuantizedLinear(grid, grid.project(W, params, g_idx), params, g_idx)
    return QuantizedModel({"model_type": "llama"}, {}, {"w.weight": ql})


@pytest.mark.parametrize("act_order", [False, True])
def test_synthetic_marlin_shape_cpu_int4(act_order):
    rows = gpu.check_gpu(_marlin_model(act_order))
    for k in ("torch _weight_int4pack_mm_for_cpu CPU-kernel fp16", "torch _weight_int4pack_mm_for_cpu CPU-kernel bf16"):
        assert [r["status"] for r in _by(rows, k)] == ["exact"], _by(rows, k)
    assert gpu.ok(rows)


@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_kernels_exact(act_order, bits):
    rows = gpu.check_gpu(_marlin_model(act_order, bits))
    ran = [r for r in rows if r["status"] in ("exact", "differs")]
    assert ran and gpu.ok(rows), gpu.format_rows(rows)
    if bits == 4:
        assert [r["status"] for r in _by(rows, "torch _weight_int4pack_mm cuda bf16")] == ["exact"]


@needs_stories
def test_tampered_gptq_file_differs(tmp_path, capsys):
    """The written-file path: a scale changed in model.safetensors shows up in the CPU int4 kernel's rows, rc 1."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "g4"
    assert main(export_args(out, "--sym", "--fallback", "keep", to="gptq", bits=4, group=32)) == 0
    f = out / "model.safetensors"
    t = load_file(str(f))
    key = "model.layers.0.self_attn.q_proj.scales"
    t[key][0, 0] = t[key][0, 0] * 2
    save_file(t, str(f), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["check", str(out), "--gpu", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["tensors"]
    bad = [r for r in rows if r["status"] == "differs"]
    assert bad and {r["tensor"] for r in bad} == {"model.layers.0.self_attn.q_proj.weight"}
    assert all(r["n_diff"] > 0 for r in bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tritonv2_dequant_interpreter_asym_act_order(bits, monkeypatch):
    """GPTQModel's TritonV2 dequant kernel through Triton's CPU interpreter: asym, act-order, 2/3/4/8-bit."""
    import importlib.util

    from kernels_check import gpu_triton

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the TritonV2 kernel runs on CPU only under TRITON_INTERPRET=1)")
    if not gpu_triton.SRC.is_file():
        pytest.skip(f"TritonV2 dequant not staged ({gpu_triton.SRC}); run `make gpu-stage`")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=g)
    grid = int_grid("gptq", bits, 32, False)
    g_idx = torch.empty(256, dtype=torch.int32)
    g_idx[torch.randperm(256, generator=g)] = (torch.arange(256) // 32).int()
    params = grid.fit(W)
    ir = QuantizedModel({"model_type": "llama"}, {}, {"w.weight": QuantizedLinear(grid, grid.project(W, params, g_idx), params, g_idx)})
    rows = gpu.check_gpu(ir, only="TRITON_INTERPRET")
    assert [r["status"] for r in rows] == ["exact"], rows


def _gguf_model(types) -> QuantizedModel:
    from admmq_export.grids import GGUF_GRIDS

    g = torch.Generator().manual_seed(1)
    lin = {}
    for t in types:
        grid = GGUF_GRIDS[t]
        W = torch.randn(32, 512, generator=g)
        codes, params = grid.quantize_rtn(W)
        lin[f"{t}.weight"] = QuantizedLinear(grid, codes, params)
    return QuantizedModel({"model_type": "llama"}, {}, lin)


def test_every_gguf_type_ggml_cpu_exact():
    """Every GGUF type we write, packed by converters.gguf_pack, through ggml-cpu's GET_ROWS graph and to_float."""
    from admmq_export.grids import GGUF_GRIDS
    from kernels_check import gpu_ggml

    if gpu_ggml.ready("cpu"):
        pytest.skip(gpu_ggml.ready("cpu"))
    rows = gpu.check_gpu(_gguf_model(list(GGUF_GRIDS)), only="CPU-kernel")
    assert len(rows) == 2 * len(GGUF_GRIDS)
    assert all(r["status"] == "exact" for r in rows), gpu.format_rows(rows)


@pytest.mark.parametrize("typ", ["Q8_0", "Q6_K"])
def test_ggml_mul_mat_probe_orientation_on_cpu(typ):
    """The CUDA graph's MUL_MAT(w, I) branch on the CPU backend: same weight up to the CPU's q8 activations."""
    from kernels_check import gpu_ggml

    if gpu_ggml.ready("cpu"):
        pytest.skip(gpu_ggml.ready("cpu"))
    t = gpu.tensors_from_ir(_gguf_model([typ]))[0]
    got = gpu_ggml.run(t, "cpu", op="mul_mat")
    assert got.shape == t.target.shape
    assert torch.allclose(got, t.target, rtol=2e-2, atol=1e-3)


@needs_cuda
def test_ggml_cuda_every_gguf_type():
    from admmq_export.grids import GGUF_GRIDS
    from kernels_check import gpu_ggml

    if gpu_ggml.ready("cuda"):
        pytest.skip(gpu_ggml.ready("cuda"))
    rows = gpu.check_gpu(_gguf_model(list(GGUF_GRIDS)), only="ggml-cuda")
    print(gpu.format_rows(rows))
    assert len(rows) == len(GGUF_GRIDS) and all(r["status"] in ("exact", gpu.SIGNED_ZERO) for r in rows)


def test_signed_zero_only_through_a_gemm_probe():
    """A GEMM probe that returns +0 for the IR's -0 is 'exact up to -0'; any other bit, or a direct dequantizer, differs."""
    import dataclasses

    from kernels_check.gpu import BlockTensor, Kernel

    target = torch.tensor([[1.5, -0.0, 0.0, -2.0]])
    t = BlockTensor("w", "Q6_K", None, (1, 4), target)
    plus = target + 0.0  # -0 + 0 = +0
    gemm = Kernel("probe", BlockTensor, "cpu", lambda t: "", lambda: "", lambda t, d: plus, torch.float32, torch.float32,
                  gemm_probe=lambda t: True)
    r = gpu.check_one(t, gemm, "cpu")
    assert r["status"] == gpu.SIGNED_ZERO and r["n_diff"] == 1 and gpu.ok([r])
    other = plus.clone()
    other[0, 0] = 1.5000001
    r = gpu.check_one(t, dataclasses.replace(gemm, run=lambda t, d: other), "cpu")
    assert r["status"] == "differs" and not gpu.ok([r])
    r = gpu.check_one(t, dataclasses.replace(gemm, gemm_probe=None), "cpu")
    assert r["status"] == "differs"
    assert gpu.zero_sign_only(plus, target) == 1 and gpu.zero_sign_only(target, target) == 0


@needs_stories
@pytest.mark.parametrize("to", ["gptq", "gguf:q8_0"])
def test_slice_copies_bytes_and_checks(tmp_path, to, capsys):
    """kernels_check.slice: only the matching linears, their bytes verbatim, and `check --gpu` runs on the slice."""
    from safetensors.torch import load_file

    from kernels_check.slice import slice_output

    src = tmp_path / ("full.gguf" if to.startswith("gguf") else "full")
    assert main(export_args(src, "--sym", "--fallback", "keep", to=to, bits=4, group=32)) == 0
    dest = tmp_path / ("part.gguf" if to.startswith("gguf") else "part")
    slice_output(src, dest, r"layers\.1\.self_attn\.(q|v)_proj")
    ir = QuantizedModel.load(tmp_path / f"{dest.name}.ir")
    assert sorted(ir.linears) == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    assert ir.tensors == {}
    if to.startswith("gguf"):
        from gguf import GGUFReader

        full = {t.name: bytes(t.data) for t in GGUFReader(str(src)).tensors}
        part = {t.name: bytes(t.data) for t in GGUFReader(str(dest)).tensors}
        assert sorted(part) == ["blk.1.attn_q.weight", "blk.1.attn_v.weight"]
    else:
        full, part = load_file(str(src / "model.safetensors")), load_file(str(dest / "model.safetensors"))
        assert part and all(k.startswith(("model.layers.1.self_attn.q_proj.", "model.layers.1.self_attn.v_proj.")) for k in part)
    assert all(torch.equal(torch.as_tensor(part[k]), torch.as_tensor(full[k])) if not isinstance(part[k], bytes)
               else part[k] == full[k] for k in part)
    capsys.readouterr()
    assert main(["check", str(dest), "--gpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert len({r["tensor"] for r in rows if r["status"] == "exact"}) == 2, rows
    with pytest.raises(SystemExit):
        slice_output(src, tmp_path / "none", r"no_such_layer")

"""Grid properties for every registered grid."""
import numpy as np
import pytest
import torch

from admmq_export.errors import UserError
from admmq_export.grids import GGUF_GRIDS, all_grids, int_grid
from kernels_check import ggml_ctypes

GRIDS = all_grids()


def _weights(rows=6, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.04
    W[0, :7] *= 12  # outliers
    W[1] = W[1].abs()  # one all-positive row (asymmetric groups)
    return W


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_codes_in_range_and_projection_is_idempotent(grid):
    W = _weights()
    codes, params = grid.quantize_rtn(W)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.qmax
    deq = grid.dequant(codes, params)
    assert deq.dtype == grid.runtime_dtype
    again = grid.dequant(grid.project(deq.float(), params), params)
    assert torch.equal(again.view(torch.int16 if again.dtype == torch.float16 else torch.int32),
                       deq.view(torch.int16 if deq.dtype == torch.float16 else torch.int32))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_projection_is_nearest_grid_point(grid):
    W = _weights(rows=3, cols=256, seed=1)
    codes, params = grid.quantize_rtn(W)
    a, b = grid.column_affine(params, W.shape[1])
    cand = torch.arange(grid.qmax + 1, dtype=torch.float64)
    vals = a.double().unsqueeze(-1) * cand + b.double().unsqueeze(-1)  # [r, c, q]
    best = (vals - W.double().unsqueeze(-1)).abs().min(-1).values
    got = (grid.dequant(codes, params).double() - W.double()).abs()
    # the chosen point is nearest up to the runtime dtype's rounding of the grid value
    tol = 1e-3 * a.abs().double() + (1e-3 if grid.runtime == "fp16" else 1e-6) * W.abs().double()
    assert (got <= best + tol).all()


@pytest.mark.parametrize("kind", ["int", "gptq", "marlin"])
@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, True), (4, False), (8, True)])
def test_int_dequant_is_formula(kind, bits, sym):
    if kind == "marlin" and (bits not in (4, 8) or not sym):
        with pytest.raises(UserError):
            int_grid(kind, bits, 64, sym)
        return
    grid = int_grid(kind, bits, 64, sym)
    W = _weights(cols=256)
    codes, p = grid.quantize_rtn(W)
    s = p["scale"].float().repeat_interleave(64, dim=1).reshape(W.shape).double()
    z = p["zero"].double().repeat_interleave(64, dim=1).reshape(W.shape)
    exact = s * (codes.double() - z)  # formats.md §0: s·(q−z), rounded once to the runtime dtype
    assert p["scale"].dtype == torch.float16 and p["zero"].dtype == torch.uint8
    if sym:
        assert (p["zero"] == 2 ** (bits - 1)).all()
    assert torch.equal(grid.dequant(codes, p), exact.to(grid.runtime_dtype))


def test_gguf_grid_formulas_match_llama_cpp_definitions():
    W = _weights(cols=512)
    for t, grid in GGUF_GRIDS.items():
        codes, p = grid.quantize_rtn(W)
        q = codes.double()
        if t in ("Q4_0", "Q5_0", "Q8_0"):
            d = p["d"].double().repeat_interleave(32, 1).reshape(W.shape)
            ref = (q - grid.offset) * d
        elif t in ("Q4_1", "Q5_1"):
            d = p["d"].double().repeat_interleave(32, 1).reshape(W.shape)
            m = p["m"].double().repeat_interleave(32, 1).reshape(W.shape)
            ref = q * d + m
        else:
            sub = grid.sub_size
            d = p["d"].double().repeat_interleave(256, 1).reshape(W.shape)
            sc = p["sc"].double().reshape(W.shape[0], -1).repeat_interleave(sub, 1)
            if "dmin" in p:
                dmin = p["dmin"].double().repeat_interleave(256, 1).reshape(W.shape)
                mm = p["m"].double().reshape(W.shape[0], -1).repeat_interleave(sub, 1)
                ref = d * sc * q - dmin * mm
            else:
                ref = d * sc * (q - grid.offset)
        # llama.cpp computes in fp32 with exact products: the fp64 value rounded once to fp32
        assert torch.equal(grid.dequant(codes, p), ref.float()), t


def test_reruns_are_byte_identical():
    W = _weights()
    for grid in GRIDS:
        c1, p1 = grid.quantize_rtn(W, clip_search=True)
        c2, p2 = grid.quantize_rtn(W.clone(), clip_search=True)
        assert torch.equal(c1, c2) and all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("grid", [int_grid("int", 3, 32, False), GGUF_GRIDS["Q4_K"], GGUF_GRIDS["Q3_K"]], ids=lambda g: g.name)
def test_clip_search_never_worse(grid):
    W = _weights(cols=512, seed=3)
    c0, p0 = grid.quantize_rtn(W)
    c1, p1 = grid.quantize_rtn(W, clip_search=True)
    e0 = ((grid.dequant(c0, p0).double() - W.double()) ** 2).sum(1)
    e1 = ((grid.dequant(c1, p1).double() - W.double()) ** 2).sum(1)
    assert (e1 <= e0 + 1e-12).all() and e1.sum() < e0.sum()


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_refit_clip_search_beats_the_shrink_search(grid):
    """--clip-search refit (ranges x0.8..x1.1, each with the weighted least-squares parameters for its codes) never
    does worse than min/max on any block, and on the whole lowers the weighted error the shrink search leaves."""
    W = _weights(rows=16, cols=512, seed=5)
    w = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 3 + 0.01
    errs = {}
    for mode in (False, "shrink", "refit"):
        c, p = grid.quantize_rtn(W, clip_search=mode, weight=w)
        assert int(c.max()) <= grid.qmax
        errs[mode] = (((grid.dequant(c, p).double() - W.double()) ** 2) * w.double()).reshape(16, -1, grid.unit(512)).sum(-1)
    assert (errs["refit"] <= errs[False] * (1 + 1e-6) + 1e-12).all()
    assert errs["refit"].sum() < errs["shrink"].sum()
    c1, p1 = grid.quantize_rtn(W, clip_search="refit", weight=w)
    assert torch.equal(c1, c) and all(torch.equal(p1[k], p[k]) for k in p)  # deterministic


def _llamacpp_quantized(typ, imatrix):
    """Weights quantized by llama.cpp's own quantizer (ggml_quantize_chunk, with or without an importance matrix)
    and read back by its own dequantization: blocks exactly as a downloaded GGUF holds them."""
    from gguf import GGMLQuantizationType

    ok, why = ggml_ctypes.available()
    if not ok:
        pytest.skip(why)
    rng = np.random.default_rng(0)
    W = (rng.standard_t(5, (32, 1024)) * 0.02).astype(np.float32)
    im = rng.lognormal(0, 1.0, 1024).astype(np.float32)
    qt = GGMLQuantizationType[typ]
    V = ggml_ctypes.dequantize(ggml_ctypes.quantize(W, qt, im if imatrix else None), qt, W.shape)
    return torch.from_numpy(W), torch.from_numpy(im), torch.from_numpy(V)


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("typ", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_refit_search_re_finds_blocks_llamacpp_wrote(typ, imatrix):
    """Re-exporting a K-quant GGUF (Gemma-3-270M ships as Q4_K_M) at its own types: the refit search (per
    sub-block, codes anchored at the minimum as make_qkx2_quants does, signed super-scales as quantize_row_q3_K /
    q6_K write them, super-scale candidates as make_qp_quants searches) gives back llama.cpp's blocks exactly,
    where min/max gives back few."""
    grid = GGUF_GRIDS[typ]
    _, _, V = _llamacpp_quantized(typ, imatrix)
    exact = {}
    for mode in (False, "refit"):
        c, p = grid.quantize_rtn(V, clip_search=mode)
        exact[mode] = float((grid.dequant(c, p).float() == V).reshape(V.shape[0], -1, 256).all(-1).float().mean())
    assert exact["refit"] >= (0.8 if imatrix else 0.9) and exact["refit"] > exact[False] + 0.2, exact


@pytest.mark.parametrize("typ", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"])
def test_refit_search_weighted_error_beats_llamacpp_with_imatrix(typ):
    """The role the importance matrix plays in llama.cpp's scale search: with the same per-column weights, the
    refit search leaves less weighted error than llama-quantize --imatrix on every type (min/max leaves more)."""
    grid = GGUF_GRIDS[typ]
    W, im, V = _llamacpp_quantized(typ, True)
    w = im.double()
    werr = lambda D: float((((D.double() - W.double()) ** 2) * w).sum())  # noqa: E731
    ref = werr(V)
    c0, p0 = grid.quantize_rtn(W)
    c1, p1 = grid.quantize_rtn(W, clip_search="refit", weight=im)
    assert werr(grid.dequant(c0, p0)) > ref
    assert werr(grid.dequant(c1, p1)) < ref


def test_unknown_clip_search_is_a_clear_error():
    with pytest.raises(UserError, match="unknown clipping search"):
        GGUF_GRIDS["Q4_0"].fit(_weights(), clip_search="bogus")


def test_shape_not_divisible_is_a_clear_error():
    with pytest.raises(UserError, match="not divisible by the group size 32"):
        int_grid("int", 4, 32, True).check_shape(64, 172, "down_proj")
    with pytest.raises(UserError, match="not divisible"):
        GGUF_GRIDS["Q4_K"].check_shape(64, 576, "q_proj")

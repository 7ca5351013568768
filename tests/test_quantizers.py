"""GPTQ and ADMM-Q: exact answers on tiny problems, monotone local search, validity on every grid, determinism."""
import dataclasses
import itertools
import json

import pytest
import torch

from admmq_export.cli import main
from admmq_export.grids import GGUF_GRIDS, all_grids, int_grid
from admmq_export.quantizers import get_quantizer
from admmq_export.quantizers.local_search import local_search
from conftest import export_args


def _problem(m, n, seed=0, corr=0.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(max(64, 4 * n), n, generator=g) @ (torch.randn(n, n, generator=g) * corr + torch.eye(n))
    return torch.randn(m, n, generator=g) * 0.1, 2 * X.T @ X / X.shape[0]


def _f(W, H, grid, res):
    a, b = grid.column_affine(res.params, W.shape[1], res.g_idx)
    E = (a * res.codes.float() + b).double() - W.double()
    return 0.5 * float(((E @ H.double()) * E).sum())


def _exhaustive(w, H, a, b, qmax):
    """min over every code vector of one row (n ≤ 8 columns)."""
    n = w.numel()
    codes = torch.tensor(list(itertools.product(range(qmax + 1), repeat=n)), dtype=torch.float64)
    E = codes * a.double() + b.double() - w.double()
    return float((0.5 * (E @ H.double()) * E).sum(1).min())


def test_gptq_two_columns_is_the_obs_update():
    """Column 0 is rounded, column 1 absorbs its error by the closed-form OBS step, then is rounded."""
    grid = int_grid("int", 4, 0, False)
    H = torch.tensor([[2.0, 0.9], [0.9, 1.0]])
    W = torch.tensor([[0.30, -0.20], [0.11, 0.47], [-0.5, 0.05]])
    res = get_quantizer("gptq")(W, H, grid, damp=0.0)
    a, b = grid.column_affine(res.params, 2)
    q0 = torch.clamp(torch.round((W[:, 0] - b[:, 0]) / a[:, 0]), 0, 15)
    w1 = W[:, 1] + (W[:, 0] - (a[:, 0] * q0 + b[:, 0])) * H[0, 1] / H[1, 1]
    q1 = torch.clamp(torch.round((w1 - b[:, 1]) / a[:, 1]), 0, 15)
    assert torch.equal(res.codes[:, 0].float(), q0)
    assert torch.equal(res.codes[:, 1].float(), q1)


def test_admmq_is_exact_when_the_problem_separates():
    """Diagonal H: each entry is its own problem and the nearest grid point is the exact optimum."""
    grid = int_grid("int", 2, 4, False)
    W, _ = _problem(3, 8, seed=3)
    H = torch.diag(torch.rand(8) + 0.5)
    res = get_quantizer("admmq")(W, H, grid, damp=0.0)
    a, b = grid.column_affine(res.params, 8)
    for i in range(3):
        e = (a[i] * res.codes[i].float() + b[i]).double() - W[i].double()
        assert 0.5 * float(e @ H.double() @ e) == pytest.approx(_exhaustive(W[i], H, a[i], b[i], 3), rel=1e-9)


def test_admmq_on_tiny_problems_against_exhaustive_search():
    """Correlated H, 2-bit, 8 columns: optimum by enumerating all 4^8 code vectors per row.

    Stated bound: ADMM-Q + local search (run to convergence) is 1-opt (no single code change lowers f), reaches the
    exact optimum on at least half of the rows, and its total objective is at most GPTQ's on the same problems."""
    grid = int_grid("int", 2, 4, False)
    hits = rows = 0
    f_admm = f_gptq = 0.0
    for seed in range(12):
        W, H = _problem(3, 8, seed=seed)
        res = get_quantizer("admmq")(W, H, grid, damp=0.0, local_search_sweeps=50)
        f_admm += _f(W, H, grid, res)
        f_gptq += _f(W, H, grid, get_quantizer("gptq")(W, H, grid, damp=0.0))
        a, b = grid.column_affine(res.params, 8)
        for i in range(3):
            c = res.codes[i].double()
            e = c * a[i].double() + b[i].double() - W[i].double()
            f = 0.5 * float(e @ H.double() @ e)
            for j, q in itertools.product(range(8), range(4)):  # 1-opt
                c2 = c.clone()
                c2[j] = q
                e2 = c2 * a[i].double() + b[i].double() - W[i].double()
                assert 0.5 * float(e2 @ H.double() @ e2) >= f - 1e-9 * abs(f)
            opt = _exhaustive(W[i], H, a[i], b[i], 3)
            assert f >= opt - 1e-9 * opt
            hits += f <= opt * (1 + 1e-9)
            rows += 1
    assert hits >= rows // 2, (hits, rows)
    assert f_admm <= f_gptq


@pytest.mark.parametrize("grid", all_grids(), ids=lambda g: g.name)
def test_local_search_never_increases_the_objective(grid):
    n = 512 if grid.family == "gguf" else 128
    W, H = _problem(6, n, seed=1)
    codes, params = grid.quantize_rtn(W)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, grid.qmax + 1, codes.shape, generator=g).to(torch.uint8)  # a bad start
    a, b = grid.column_affine(params, n)
    before = float((0.5 * ((a * codes.float() + b - W).double() @ H.double()) * (a * codes.float() + b - W).double()).sum())
    new, st = local_search(codes, a, b, W, H, grid.qmax, sweeps=2)
    E = (a * new.float() + b - W).double()
    after = 0.5 * float(((E @ H.double()) * E).sum())
    assert after <= before
    assert st["ls_moves"] > 0 and after < before


def _cd_reference(codes, a, b, W, H, qmax, sweeps):
    """Cyclic coordinate descent the plain way, fp64: column by column, gradient recomputed for every column."""
    q, a, b, W, H = codes.double().clone(), a.double(), b.double(), W.double(), H.double()
    for _ in range(sweeps):
        for j in range(W.shape[1]):
            E = a * q + b - W
            r = E @ H[:, j]
            c = (q[:, j] - r / (a[:, j] * H[j, j])).round().clamp(0, qmax)
            d = a[:, j] * (c - q[:, j])
            q[:, j] = torch.where(d * (r + 0.5 * H[j, j] * d) < 0, c, q[:, j])
    return q


@pytest.mark.parametrize("block", [1, 7, 128])
def test_local_search_is_the_sequential_sweep(block):
    """The round-based block sweep makes the moves of plain column-by-column CD, in the same order per row."""
    grid = int_grid("int", 3, 16, False)
    W, H = _problem(24, 48, seed=3)
    codes, params = grid.quantize_rtn(W)
    codes = torch.randint(0, grid.qmax + 1, codes.shape, generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    a, b = grid.column_affine(params, 48)
    new, st = local_search(codes, a, b, W, H, grid.qmax, sweeps=2, tol=0.0, block=block)
    assert st["ls_sweeps"] == 2 and st["ls_moves"] > 100
    assert torch.equal(new.double(), _cd_reference(codes, a, b, W, H, grid.qmax, 2))


@pytest.mark.parametrize("m", [96, 8])  # m >= n: dense M_ρ, one GEMM; m < n: factored solves (CPU)
def test_admm_w_step_solvers_agree(m):
    """The Cholesky W-step (default) and the eigendecomposition form solve the same B·(H̃ + ρI) = R, every ρ, in
    the dense and the factored form; through ADMM-Q they reach the same objective to 0.2% (fp32 rounding
    can send the two down different paths at a tie). Factors are reused across W-steps sharing a Hessian, and the reused ones give the same answers."""
    from admmq_export.quantizers.admmq import WStep

    W, H = _problem(m, 64, seed=5)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    d = Hd.diagonal().sqrt()
    Ht = Hd / d[:, None] / d[None, :]
    R = torch.randn(m, 64, generator=torch.Generator().manual_seed(1))
    cache = {}
    chol, eig = WStep(Ht, m, "cholesky", cache), WStep(Ht, m, "eigh")
    assert chol.dense == (m >= 64)
    for rho in (0.02, 0.1, 1.3, 250.0):
        exact = torch.linalg.solve(Ht.double() + rho * torch.eye(64, dtype=torch.float64), R.double().T).T
        for ws in (chol, eig):
            assert float((ws(R, rho).double() - exact).norm() / exact.norm()) < 1e-4
    again = WStep(Ht, m, "cholesky", cache)  # a second layer on the same H: every factor comes from the cache
    assert sum(k[0] == "cholesky" for k in cache if isinstance(k, tuple)) == 4
    for rho in (0.1, 250.0):
        assert torch.equal(again(R, rho), chol(R, rho))
    grid = int_grid("int", 3, 16, False)
    f = {s: _f(W, H, grid, get_quantizer("admmq")(W, H, grid, solver=s)) for s in ("cholesky", "eigh")}
    assert f["cholesky"] == pytest.approx(f["eigh"], rel=2e-3)  # fp32 rounding can split the paths at a tie
    with pytest.raises(Exception, match="solver"):
        get_quantizer("admmq")(W, H, grid, solver="lu")


def test_factor_cache_snapshot_restores_a_first_run():
    """A benchmark times a rerun of a layer from the factor cache as it was before the first run: after a restore the
    factors the first run added are gone (the rerun builds them again), the codes are the same, and the snapshot
    itself is not changed by the rerun."""
    from admmq_export.quantizers import admmq

    W, H = _problem(32, 64, seed=6)
    grid = int_grid("int", 3, 16, False)
    snap = admmq.factor_cache_snapshot()
    first = get_quantizer("admmq")(W, H, grid)
    mine = [v for v in admmq._FACTORS.values() if v[0]() is H]
    assert len(mine) == 1 and any(isinstance(k, tuple) for k in mine[0][3])  # factors of H + ρI were cached
    admmq.factor_cache_restore(snap)
    assert not [v for v in admmq._FACTORS.values() if v[0]() is H]
    again = get_quantizer("admmq")(W, H, grid)
    assert torch.equal(first.codes, again.codes)
    assert not [v for v in snap.values() if v[0]() is H]


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_admmq_never_worse_than_its_initialisation(init):
    for grid in (int_grid("int", 3, 32, False), GGUF_GRIDS["Q3_K"], int_grid("marlin", 4, 128, True)):
        n = 256
        W, H = _problem(16, n, seed=4)
        res = get_quantizer("admmq")(W, H, grid, init=init, iters=6, local_search=False)  # cut short on purpose
        assert res.stats["f_final"] <= res.stats["f_init"]
        full = get_quantizer("admmq")(W, H, grid, init=init)
        assert full.stats["f_final"] <= full.stats["f_init"]


def _assert_valid_beats_rtn(W, H, grid, r, rtn):
    """Codes in range, parameters shaped and typed as RTN's, finite weights, and a lower objective than RTN."""
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= grid.qmax
    for k, v in rtn.params.items():
        assert r.params[k].shape == v.shape and r.params[k].dtype == v.dtype
    assert torch.isfinite(grid.dequant(r.codes, r.params, r.g_idx)).all()
    assert _f(W, H, grid, r) < _f(W, H, grid, rtn)  # beats RTN on a correlated problem


@pytest.mark.parametrize("grid", all_grids(), ids=lambda g: g.name)
def test_codes_valid_and_deterministic_on_every_grid(grid):
    n = 512 if grid.family == "gguf" else 128
    W, H = _problem(8, n, seed=5)
    rtn = get_quantizer("rtn")(W, H, grid)
    for method in ("gptq", "admmq"):
        r1 = get_quantizer(method)(W, H, grid)
        r2 = get_quantizer(method)(W.clone(), H.clone(), grid)
        _assert_valid_beats_rtn(W, H, grid, r1, rtn)
        assert torch.equal(r1.codes, r2.codes)
        for k in rtn.params:
            assert torch.equal(r1.params[k], r2.params[k])


def test_gptq_act_order_g_idx():
    grid = int_grid("gptq", 4, 32, False)
    W, H = _problem(8, 128, seed=6)
    s = torch.linspace(0.3, 2, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    H = s[:, None] * H * s[None, :]  # spread-out diagonal -> a real permutation
    dyn = get_quantizer("gptq")(W, H, grid, act_order=True)
    assert dyn.g_idx is not None and sorted(torch.bincount(dyn.g_idx.long()).tolist()) == [32] * 4
    assert not torch.equal(dyn.g_idx.long(), torch.arange(128) // 32)
    static = get_quantizer("gptq")(W, H, grid, act_order=True, static_groups=True)
    assert static.g_idx is None
    with pytest.raises(Exception, match="act-order"):
        get_quantizer("gptq")(W, H, GGUF_GRIDS["Q4_K"], act_order=True)


def test_pipeline_admmq_beats_gptq_beats_rtn_on_real_layers(tmp_path, capsys):
    f = {}
    for method in ("rtn", "gptq", "admmq"):
        rep = tmp_path / f"{method}.json"
        assert main(export_args(tmp_path / method, "--json-report", str(rep), method=method, bits=3, group=32,
                                to="ir")) == 0
        f[method] = json.loads(rep.read_text())["stats"]
    common = sorted(k for k in f["admmq"] if "layers" in k)
    wins = sum(f["admmq"][k]["objective"] <= f["gptq"][k]["objective"] for k in common)
    assert wins >= 0.9 * len(common)
    assert sum(f["gptq"][k]["objective"] for k in common) < sum(f["rtn"][k]["objective"] for k in common)


def test_admmq_refuses_act_order(tmp_path, capsys):
    assert main(export_args(tmp_path / "o", "--act-order", method="admmq")) != 0
    assert "act-order" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _reference_fasterquant(W, H, scale_col, zero_col, maxq, blocksize=128, percdamp=0.01, actorder=False):
    """IST-DASLab/gptq `GPTQ.fasterquant` transcribed (per-column scale/zero given, as with static groups)."""
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        scale_col, zero_col = scale_col[:, perm], zero_col[:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    H[range(H.shape[0]), range(H.shape[0])] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            s, z = scale_col[:, i1 + i], zero_col[:, i1 + i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, i1 + i] = q
            err1 = (w - s * (q - z)) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, invperm] if actorder else Q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_reference_implementation(act_order):
    """Same codes as the transcribed IST-DASLab loop on a fixed (static-groups) grid, with and without act-order."""
    grid = int_grid("int", 3, 32, False)
    W, H = _problem(16, 256, seed=7)
    res = get_quantizer("gptq")(W, H, grid, static_groups=True, act_order=act_order)
    s = res.params["scale"][..., 0].float().repeat_interleave(32, dim=1)
    z = res.params["zero"][..., 0].float().repeat_interleave(32, dim=1)
    ref = _reference_fasterquant(W, H, s, z, grid.qmax, actorder=act_order)
    agree = (ref == res.codes.float()).float().mean()
    assert agree > 0.999, agree  # rounding ties of round((w−b)/s) vs round(w/s)+z may flip a rare code


REFIT_GRIDS = [int_grid("gptq", 3, 32, False), int_grid("gptq", 3, 32, True),
               *(GGUF_GRIDS[t] for t in ("Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))]


@pytest.mark.parametrize("grid", REFIT_GRIDS, ids=lambda g: g.name)
def test_grid_refresh_lowers_the_objective(grid):
    """Every refittable grid — int/GPTQ (fp16 scale + integer zero), the 32-element GGUF types (fp16 d, and m for
    Q*_1) and the K-quants (a new fp16 super-scale, integer sub-scales/mins under it): the refit parameters keep
    their storage dtypes and ranges, the codes stay valid, and the objective drops."""
    W, H = _problem(24, max(128, grid.group_size), seed=8)
    plain = get_quantizer("admmq")(W, H, grid)
    ref = get_quantizer("admmq")(W, H, grid, refit=True)
    assert ref.stats["f_final"] <= plain.stats["f_final"]
    assert {k: v.dtype for k, v in ref.params.items()} == {k: v.dtype for k, v in plain.params.items()}
    assert {k: v.shape for k, v in ref.params.items()} == {k: v.shape for k, v in plain.params.items()}
    if grid.sub_size:  # sub-scales within what the block's bit fields hold
        lo, hi = getattr(grid, "sc_lo", 0), getattr(grid, "sc_hi", getattr(grid, "sc_max", 0))
        assert lo <= int(ref.params["sc"].min()) and int(ref.params["sc"].max()) <= hi
    assert int(ref.codes.max()) <= grid.qmax
    assert ref.stats["f_refit"] < plain.stats["f_final"], "the refit was not kept"
    assert _f(W, H, grid, ref) < _f(W, H, grid, plain)


def test_refit_is_the_least_squares_optimum(monkeypatch):
    """The blockwise normal equations equal the dense ones (J formed explicitly) on a K-quant grid with
    sub-blocks: the refit (a, b) per sub-block is the exact minimiser of f for the given codes."""
    from admmq_export.quantizers import refit as rf

    grid = GGUF_GRIDS["Q4_K"]
    W, H = _problem(5, 256, seed=3)
    codes = torch.randint(0, 16, W.shape, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    got = {}
    monkeypatch.setattr(type(grid), "store_affine", lambda self, a, b: got.update(a=a, b=b) or {})
    rf.refit(grid, codes, W, H)
    G, s = 8, 32
    eye = torch.eye(G, dtype=torch.float64)
    q = codes.double().reshape(5, G, s)
    J = torch.cat([(q.unsqueeze(-1) * eye[None, :, None, :]).reshape(5, 256, G),
                   eye[:, None, :].expand(G, s, G).reshape(1, 256, G).expand(5, 256, G)], -1)
    for r in range(5):
        A = J[r].T @ H.double() @ J[r]
        theta = torch.linalg.solve(A, J[r].T @ H.double() @ W[r].double())
        assert torch.allclose(got["a"][r], theta[:G], rtol=1e-7, atol=1e-10)
        assert torch.allclose(got["b"][r], theta[G:], rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path runs only on a CUDA host")
@pytest.mark.parametrize("grid", all_grids(), ids=lambda g: g.name)
def test_cuda_quantizers_every_grid(grid):
    """GPTQ and ADMM-Q on CUDA tensors, every grid: valid codes, both beat RTN, and the same quality as on CPU."""
    n = 512 if grid.family == "gguf" else 128
    W, H = _problem(8, n, seed=5)
    rtn = get_quantizer("rtn")(W, H, grid)
    for method in ("gptq", "admmq"):
        cpu = get_quantizer(method)(W, H, grid)
        r = get_quantizer(method)(W.cuda(), H.cuda(), grid)
        r = dataclasses.replace(r, codes=r.codes.cpu(), params={k: v.cpu() for k, v in r.params.items()},
                                g_idx=None if r.g_idx is None else r.g_idx.cpu())
        _assert_valid_beats_rtn(W, H, grid, r, rtn)
        f, f_cpu = _f(W, H, grid, r), _f(W, H, grid, cpu)
        assert f <= 1.02 * f_cpu, (method, f, f_cpu)


@pytest.mark.parametrize("t", ["Q3_K", "Q4_K"])
def test_refit_row_chunks_change_nothing(monkeypatch, t):
    """Rows are refitted independently: one row per chunk gives the same parameters as one chunk for all."""
    from admmq_export.quantizers import refit as rf

    grid = GGUF_GRIDS[t]
    W, H = _problem(6, 256, seed=4)
    codes = torch.randint(0, grid.qmax + 1, W.shape, generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    cur = grid.fit(W)
    whole = rf.refit(grid, codes, W, H, current=cur)
    monkeypatch.setattr(rf, "SYSTEM_CHUNK_BYTES", 1)
    rows = rf.refit(grid, codes, W, H, current=cur)
    assert whole.keys() == rows.keys() and all(torch.equal(whole[k], rows[k]) for k in whole)


@pytest.mark.parametrize("t", ["Q4_0", "Q4_K"])
def test_alternating_refit_never_raises_the_objective(t):
    """refit_rounds > 1 (ADMM again on each refitted grid, polish, refit): the true objective of the stored result
    is at most the single refit's, and at least one round is kept."""
    grid = GGUF_GRIDS[t]
    W, H = _problem(24, max(256, grid.group_size), seed=9)
    one = get_quantizer("admmq")(W, H, grid, refit=True)
    alt = get_quantizer("admmq")(W, H, grid, refit=True, refit_rounds=3)
    assert alt.stats["refit_rounds_kept"] >= 1
    assert alt.stats["f_final"] <= one.stats["f_final"] + 1e-9
    assert _f(W, H, grid, alt) <= _f(W, H, grid, one) * (1 + 1e-6)
    assert int(alt.codes.max()) <= grid.qmax

"""Issue 3 layer benchmark: RTN vs GPTQ vs ADMM-Q on every linear of SmolLM2-135M (same W, same H from the original
model), ablations of ADMM-Q's parts on named layers of three models, convergence traces, and the time ratio."""
from __future__ import annotations

import time

import torch

from admmq_export.grids import int_grid
from admmq_export.quantizers import get_quantizer, layer_objective
from admmq_export.quantizers.admmq import factor_cache_restore, factor_cache_snapshot
from admmq_export.quantizers.local_search import local_search

from .common import PLOTS, machine, md_table, save_section
from .hessians import capture

TIMED_RUNS = 2  # all_layers: each quantizer's time per layer is the best of this many identical runs
CONFIGS = [("W3 g64 asym", 3, 64, False), ("W3 g64 sym", 3, 64, True), ("W2 g32 asym", 2, 32, False)]


def _run(method, W, H, grid, repeat=1, **kw):
    """(result, layer objective, seconds): the best of `repeat` timed runs, each from the same factor cache and all
    giving the same codes (this machine's speed drifts by 15-30% over minutes; the minimum is the quantizer's cost,
    not the noise)."""
    best, r = float("inf"), None
    cache = factor_cache_snapshot()  # ADMM-Q's factors of H + ρI, shared by q/k/v and gate/up: as before the 1st run
    for _ in range(repeat):
        factor_cache_restore(cache)
        t = time.perf_counter()
        r2 = get_quantizer(method)(W, H, grid, **kw)
        best = min(best, time.perf_counter() - t)
        if r is not None and not torch.equal(r.codes, r2.codes):
            raise RuntimeError(f"{method} gave different codes on a rerun of the same problem")
        r = r2
    return r, layer_objective(W, grid.dequant(r.codes, r.params, r.g_idx).float(), H), best


def _gptq_ls(W, H, grid):
    from admmq_export.quantizers.gptq import prepare_hessian

    t = time.perf_counter()
    r = get_quantizer("gptq")(W, H, grid)
    Wd, Hd = prepare_hessian(W, H, 0.01)
    a, b = grid.column_affine(r.params, W.shape[1], r.g_idx)
    codes, _ = local_search(r.codes, a, b, Wd, Hd, grid.qmax)
    return layer_objective(W, grid.dequant(codes, r.params, r.g_idx).float(), H), time.perf_counter() - t


def all_layers(probs):
    rows, per_layer = [], {}
    for label, bits, group, sym in CONFIGS[:1] + CONFIGS[2:]:  # the issue-3 target grids (W3 g64 sym: CPU budget)
        grid = int_grid("int", bits, group, sym)
        res = []
        for name, (W, H) in probs.items():
            _, f_rtn, _ = _run("rtn", W, H, grid)
            _, f_g, t_g = _run("gptq", W, H, grid, repeat=TIMED_RUNS)
            ra, f_a, t_a = _run("admmq", W, H, grid, repeat=TIMED_RUNS)
            res.append({"layer": name, "rtn": f_rtn, "gptq": f_g, "admmq": f_a, "t_gptq": t_g, "t_admmq": t_a,
                        "iters": ra.stats["admm_iters"]})
        per_layer[label] = res
        wins = sum(r["admmq"] <= r["gptq"] for r in res)
        ratio = sorted(r["admmq"] / r["gptq"] for r in res)
        tg, ta = sum(r["t_gptq"] for r in res), sum(r["t_admmq"] for r in res)
        rows.append({"grid": label, "layers": len(res), "ADMM-Q ≤ GPTQ": f"{wins}/{len(res)} ({100 * wins / len(res):.1f}%)",
                     "median ADMM-Q/GPTQ": ratio[len(ratio) // 2], "worst ADMM-Q/GPTQ": ratio[-1],
                     "Σf GPTQ/RTN": sum(r["gptq"] for r in res) / sum(r["rtn"] for r in res),
                     "Σf ADMM-Q/RTN": sum(r["admmq"] for r in res) / sum(r["rtn"] for r in res),
                     "GPTQ s": tg, "ADMM-Q s": ta, "time ratio": ta / tg,
                     "mean iters": sum(r["iters"] for r in res) / len(res)})
    return rows, per_layer


ABLATION = [
    ("plain ADMM (no preconditioning, ρ×1.1 schedule, no LS)", dict(precondition=False, schedule="fixed", local_search=False, iters=200)),
    ("+ Jacobi preconditioning", dict(schedule="fixed", local_search=False, iters=200)),
    ("+ ALPS penalty schedule", dict(local_search=False)),
    ("+ local search = ADMM-Q", dict()),
    ("ADMM-Q, eigendecomposition W-step (ALPS form)", dict(solver="eigh")),
    ("ADMM-Q, GPTQ initialisation", dict(init="gptq")),
    ("ADMM-Q, ρ0 = 0.01", dict(rho0=0.01)),
    ("ADMM-Q, ρ0 = 0.003", dict(rho0=0.003)),
    ("ADMM-Q + GPTQ safety net", dict(safety_net=True)),
    ("ADMM-Q + grid refresh", dict(refit=True)),
]


def ablation(problems):
    """problems: [(model, layer, W, H, grid label, grid)] -> rows relative to RTN."""
    rows = []
    for model, layer, W, H, glabel, grid in problems:
        _, f_rtn, _ = _run("rtn", W, H, grid)
        row = {"model": model, "layer": layer.replace("model.layers.", "L").replace(".weight", ""), "grid": glabel}
        iters, secs = {}, {}
        _, f, t = _run("gptq", W, H, grid)
        row["GPTQ"], secs["GPTQ"] = f / f_rtn, t
        t_g = t
        f, t = _gptq_ls(W, H, grid)
        row["GPTQ + LS"], secs["GPTQ + LS"] = f / f_rtn, t
        for label, kw in ABLATION:
            r, f, t = _run("admmq", W, H, grid, **kw)
            row[label], iters[label], secs[label] = f / f_rtn, r.stats["admm_iters"], t
            if label.startswith("+ local search"):
                row["time ADMM-Q / GPTQ"] = t / t_g
        rows.append({**row, "iters": iters, "seconds": secs})
    return rows


def ablation_summary(rows):
    """One row per variant over all ablation layers: the geometric mean of f/RTN (what it buys), the mean ADMM
    iterations and the summed quantizer seconds (what it costs) — a part that does not lower f must lower the cost."""
    import math

    out = []
    for label in ["GPTQ", "GPTQ + LS"] + [label for label, _ in ABLATION]:
        f = [r[label] for r in rows]
        it = [r["iters"][label] for r in rows if label in r["iters"]]
        out.append({"variant": label, "layers": len(f),
                    "geomean f/RTN": math.exp(sum(math.log(x) for x in f) / len(f)),
                    "mean ADMM iters": sum(it) / len(it) if it else None,
                    "Σ seconds": sum(r["seconds"][label] for r in rows)})
    return out


def traces(probs, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in probs if n.endswith(("5.self_attn.q_proj.weight", "5.mlp.down_proj.weight"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    data = {}
    for label, bits, group, sym in (CONFIGS[0], CONFIGS[2]):
        grid = int_grid("int", bits, group, sym)
        for n in names:
            W, H = probs[n]
            r = get_quantizer("admmq")(W, H, grid, trace=True)
            tr = r.stats["trace"]
            key = f"{n.replace('model.layers.', 'L').replace('.weight', '')} {label}"
            data[key] = tr
            it = [x["iter"] for x in tr]
            axes[0].semilogy(it, [x["objective"] / tr[0]["objective"] for x in tr], label=key)
            axes[1].semilogy(it, [max(x["changed"], 1e-6) for x in tr], label=key)
            axes[2].semilogy(it, [x["primal"] for x in tr], label=key)
    for ax, t in zip(axes, ["objective f(D) / f at first check", "fraction of codes changed per check",
                            "primal residual ‖B−D‖/‖B̂‖"]):
        ax.set_title(t)
        ax.set_xlabel("ADMM iteration")
    axes[0].legend(fontsize=7)
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOTS / "admmq_traces.png", dpi=110)
    plt.close(fig)
    return data


def layer_plot(per_layer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for label, res in per_layer.items():
        ax.plot(range(len(res)), [r["admmq"] / r["gptq"] for r in res], ".", label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("linear layer (SmolLM2-135M, in model order)")
    ax.set_ylabel("layer objective ADMM-Q / GPTQ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "admmq_vs_gptq_layers.png", dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    ns, sl = (8, 256) if quick else (32, 512)
    layers = [0, 5, 20] if quick else None
    probs = capture("smollm2", ns, sl, layers=layers)
    rows, per_layer = all_layers(probs)
    PLOTS.mkdir(parents=True, exist_ok=True)
    layer_plot(per_layer)
    tr = traces(probs, quick)
    g3, g2 = int_grid("int", 3, 64, False), int_grid("int", 2, 32, False)
    pick = [("model.layers.5.self_attn.q_proj.weight", "W3 g64 asym", g3), ("model.layers.5.mlp.down_proj.weight", "W3 g64 asym", g3),
            ("model.layers.20.mlp.gate_proj.weight", "W2 g32 asym", g2), ("model.layers.20.self_attn.o_proj.weight", "W3 g64 asym", g3)]
    problems = [("SmolLM2-135M", n, *probs[n], gl, g) for n, gl, g in pick if n in probs]
    st = capture("stories260k", 16, 256, layers=[2])
    problems += [("stories260K", n, *st[n], "W3 g32 asym", int_grid("int", 3, 32, False))
                 for n in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight")]
    if not quick:
        gm = capture("gemma3-270m", 16, 512, layers=[5])
        problems += [("Gemma-3-270M", n, *gm[n], "W3 g64 asym", g3)
                     for n in ("model.layers.5.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight")]
    abl = ablation(problems)
    cols = ["model", "layer", "grid", "GPTQ", "GPTQ + LS"] + [label for label, _ in ABLATION] + ["time ADMM-Q / GPTQ"]
    md = [f"## ADMM-Q vs GPTQ on real layers (`python -m bench --suite admmq_layers{' --quick' if quick else ''}`)", "",
          f"Every linear of SmolLM2-135M ({len(probs)} layers), each quantizer solving the same problem: Ŵ and H = 2XᵀX/n from "
          f"the original model on {ns} x {sl} C4 calibration tokens (seed 0). Objective ½·Tr((W−Ŵ)H(W−Ŵ)ᵀ) on the undamped H. "
          "GPTQ: damp 0.01, blocks of 128, dynamic groups, no act-order. ADMM-Q: spec defaults (ρ0 = 0.1, ALPS schedule, "
          "max 300 iterations, RTN init, 3 sweeps of exact-CD local search, no safety net; W-step: one Cholesky of H̃ + ρI "
          "per penalty value, the spec's §2.1 alternative to the fp64 eigendecomposition, which the ablation row "
          "'eigendecomposition W-step' runs for comparison). Times: quantizer only, same process, 2 CPU threads, "
          f"per layer the best of {TIMED_RUNS} runs of each quantizer (same codes each time; GPTQ and ADMM-Q alternate "
          "layer by layer, so both see the same drift of this machine's speed).", "",
          "**Target: ADMM-Q ≤ GPTQ on ≥ 95% of the layers at W3 g64 and W2 g32; ADMM-Q time ≤ 3x GPTQ.**", "",
          md_table(rows, ["grid", "layers", "ADMM-Q ≤ GPTQ", "median ADMM-Q/GPTQ", "worst ADMM-Q/GPTQ", "Σf GPTQ/RTN",
                          "Σf ADMM-Q/RTN", "GPTQ s", "ADMM-Q s", "time ratio", "mean iters"]), "",
          "![ADMM-Q / GPTQ per layer](bench/plots/admmq_vs_gptq_layers.png)", "",
          "### Ablation (layer objective relative to RTN on the same grid; lower is better)", "",
          "LS = local search (exact cyclic coordinate descent, 3 sweeps). Columns build up ADMM-Q one part at a time; "
          "the last ones are options.", "",
          md_table(abl, cols), "",
          "Per variant over these layers: what it buys (geometric mean of f/RTN) and what it costs (mean ADMM "
          "iterations, quantizer seconds summed over the layers; one run each, so ±20% from this machine's drift). "
          "The fixed schedule (ρ×1.1 every check, the spec's §10 prototype) is capped at 200 iterations, the ALPS one at "
          "300; both stop once, after 30 iterations, fewer than 0.03% of the codes change in a check.", "",
          md_table(ablation_summary(abl), ["variant", "layers", "geomean f/RTN", "mean ADMM iters", "Σ seconds"]), "",
          "### Convergence traces", "",
          "![ADMM-Q traces](bench/plots/admmq_traces.png)", "",
          f"Machine: {machine()}"]
    save_section("admmq_layers", "\n".join(md), {"summary": rows, "per_layer": per_layer, "ablation": abl, "traces": tr,
                                                 "machine": machine()})

"""Sequential ("true sequential") calibration pipeline.

For each decoder layer: capture its inputs, find the groups of linears that read the same input (q/k/v,
o, gate/up, down), accumulate H = 2·XᵀX/n in fp32 per group, quantize each linear of the group, write the
dequantized weight back, re-run the layer so the next group sees quantized inputs, and feed the quantized
layer's outputs to the next layer. Only the current layer sits on the compute device.
After each layer the state is saved beside the output, so `--resume` continues where it stopped.

`asym_calib` (GPTAQ-style asymmetric calibration, `--asym-calib`): a second, full-precision stream of inputs goes
through an unquantized copy of each layer, and each linear is fitted to the *original* model's output from the
quantized model's input, min ‖Ŵ·X̃ − W·X‖². With H = 2·X̃ᵀX̃/n and C = 2·X̃ᵀX/n that objective is
(ŵ − w*)ᵀH(ŵ − w*) + const per row, w* = H⁻¹·C·w, so every quantizer runs unchanged on the target
W* = W + W·(C − H)ᵀ·(H + λI)⁻¹ (`asym_target`; λ: the quantizer's damping) — the error earlier layers left is
compensated where possible.
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .errors import UserError
from .grids import Grid
from .ir import QuantizedLinear, QuantizedModel
from .quantizers import get_quantizer, layer_objective

GridPlan = Callable[[str, tuple], "Grid | None"]  # HF weight name, shape -> grid (None: keep float)


@dataclass
class PipelineOptions:
    method: str = "rtn"
    method_options: dict = field(default_factory=dict)
    device: str = "cpu"
    state_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    asym_calib: bool = False


class _Stop(Exception):
    """Raised by a forward hook once the inputs it needs are captured: the rest of the forward is skipped."""


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def _layer_kwargs(model, sample: torch.Tensor) -> list[dict]:
    """The keyword arguments (masks, rotary embeddings, ...) every decoder layer receives, from one forward."""
    layers = decoder_layers(model)
    kwargs: list[dict] = [None] * len(layers)  # type: ignore[list-item]
    hidden0 = {}

    def hook(i):
        def fn(mod, args, kw):
            kw = dict(kw)
            if args:
                kw.pop("hidden_states", None)
                hs = args[0]
            else:
                hs = kw.pop("hidden_states")
            kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            if i == 0:
                hidden0["x"] = hs
            if i == len(layers) - 1:
                raise _Stop

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(sample, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return kwargs


def _layer_inputs(model, samples: torch.Tensor) -> torch.Tensor:
    """Hidden states entering layer 0 for every sample, [n, L, hidden] fp32 (CPU)."""
    layer0 = decoder_layers(model)[0]
    out = []

    def fn(mod, args, kw):
        out.append((args[0] if args else kw["hidden_states"]).detach().cpu())
        raise _Stop

    h = layer0.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        for s in samples:
            try:
                with torch.no_grad():
                    model(s.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(out)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run_layer(layer, inps, kw, device) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for x in inps:
            y = layer(x.unsqueeze(0).to(device), **kw)
            y = y[0] if isinstance(y, tuple) else y
            outs.append(y.detach().cpu().reshape(x.shape))
    return torch.stack(outs)


def _linear_groups(layer, inps, kw, device) -> list[list[str]]:
    """Linears of the layer in call order, grouped by shared input tensor (one H per group)."""
    order: list[tuple[str, torch.Tensor]] = []  # keeps the inputs alive: ids of freed tensors get reused
    handles = []
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: order.append((n, a[0]))))
    try:
        _run_layer(layer, inps[:1], kw, device)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key in order:
        if groups and key is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


def _hessian(layer, names: list[str], inps, kw, device, fp_layer=None, fp_inps=None):
    """(H, C): H = 2·X̃ᵀX̃/n of the group's shared input, from a forward pass cut short at the group's first linear;
    with `fp_layer`/`fp_inps` (asymmetric calibration) C = 2·X̃ᵀX/n, X the same input in the full-precision stream
    (else None)."""
    acc = {"H": None, "C": None, "n": 0}
    grab = {}

    def capture(key):
        def fn(m, a):
            grab[key] = a[0].detach().reshape(-1, a[0].shape[-1]).float()
            raise _Stop

        return fn

    def run(lay, x, key):
        h = lay.get_submodule(names[0]).register_forward_pre_hook(capture(key))
        try:
            with torch.no_grad():
                lay(x.unsqueeze(0).to(device), **kw)
        except _Stop:
            pass
        finally:
            h.remove()
        return grab.pop(key)

    for s, x in enumerate(inps):
        xq = run(layer, x, "q")
        acc["H"] = xq.T @ xq if acc["H"] is None else acc["H"] + xq.T @ xq
        if fp_layer is not None:
            xf = run(fp_layer, fp_inps[s], "f")
            acc["C"] = xq.T @ xf if acc["C"] is None else acc["C"] + xq.T @ xf
        acc["n"] += xq.shape[0]
    return (2.0 / acc["n"]) * acc["H"], None if fp_layer is None else (2.0 / acc["n"]) * acc["C"]


def asym_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W·(C − H)ᵀ·(H + λI)⁻¹, λ = damp·mean(diag H) — undamped, W·Cᵀ·H⁻¹: the weights whose quadratic
    objective on H equals the asymmetric one, ‖Ŵ·X̃ − W·X‖², up to a constant. C − H = 2·X̃ᵀ(X − X̃)/n is the
    error the earlier layers left in this input (GPTAQ's ΔX term), so equal streams give W* = W at any damping."""
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * torch.diagonal(Hd).mean().clamp_min(1e-12))
    L = torch.linalg.cholesky(Hd)
    rhs = (C.double() - H.double()) @ W.double().T  # [n, m]
    return (W.double() + torch.cholesky_solve(rhs, L).T).to(W.dtype).contiguous()


class StateStore:
    """Per-layer checkpoint beside the output: quantized linears so far + the next layer's inputs."""

    def __init__(self, d: Path | None):
        self.d = d
        self.fp_inps = None

    def load(self):
        if self.d is None or not (self.d / "state.safetensors").is_file():
            return -1, None, {}
        flat = load_file(str(self.d / "state.safetensors"))
        import json

        info = json.loads((self.d / "state.json").read_text())
        from .grids import from_spec

        linears = {}
        for k, spec in info["linears"].items():
            params = {p: flat.pop(f"{k}.param.{p}") for p in spec["params"]}
            linears[k] = QuantizedLinear(from_spec(spec["grid"]), flat.pop(f"{k}.codes"), params, flat.pop(f"{k}.g_idx", None))
        self.fp_inps = flat.pop("__fp_inps__", None)
        return info["done"], flat.pop("__inps__"), (linears, info["stats"])

    def save(self, done: int, inps: torch.Tensor, linears: dict, stats: dict, fp_inps: torch.Tensor | None = None) -> None:
        if self.d is None:
            return
        import json

        self.d.mkdir(parents=True, exist_ok=True)
        flat = {"__inps__": inps.contiguous()}
        if fp_inps is not None:
            flat["__fp_inps__"] = fp_inps.contiguous()
        spec = {}
        for k, q in linears.items():
            flat[f"{k}.codes"] = q.codes.contiguous()
            for p, t in q.params.items():
                flat[f"{k}.param.{p}"] = t.contiguous()
            if q.g_idx is not None:
                flat[f"{k}.g_idx"] = q.g_idx.contiguous()
            spec[k] = {"grid": q.grid.spec(), "params": sorted(q.params)}
        tmp = self.d / "state.safetensors.tmp"
        save_file(flat, str(tmp))
        (self.d / "state.json.tmp").write_text(json.dumps({"done": done, "linears": spec, "stats": stats}))
        tmp.replace(self.d / "state.safetensors")
        (self.d / "state.json.tmp").replace(self.d / "state.json")

    def clear(self):
        if self.d is not None and self.d.exists():
            shutil.rmtree(self.d)


def quantize_model(model, samples: torch.Tensor, plan: GridPlan, opts: PipelineOptions,
                   meta: dict | None = None) -> tuple[QuantizedModel, dict]:
    """Run the sequential pipeline; returns the IR and per-linear statistics."""
    quantize = get_quantizer(opts.method)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available", "use --device cpu")
    model = model.eval()  # loaded in fp32 on the CPU; layers move to `device` one at a time
    layers = decoder_layers(model)
    store = StateStore(opts.state_dir)
    done, inps, saved = store.load() if opts.resume else (-1, None, {})
    linears: dict[str, QuantizedLinear] = {}
    stats: dict[str, dict] = {}
    if saved:
        linears, stats = saved
        sd = {k: q.dequant().float() for k, q in linears.items()}
        model.load_state_dict(sd, strict=False)
    if not getattr(quantize, "needs_hessian", True) and not opts.method_options.get("clip_search") and not opts.asym_calib:
        _quantize_weights_only(model, plan, quantize, opts, linears, stats)
        return _finish(model, plan, linears, stats, opts, meta)
    kwargs = _layer_kwargs(model, samples[:1])
    if inps is None:
        inps = _layer_inputs(model, samples)
    fp_inps = None
    if opts.asym_calib:
        fp_inps = store.fp_inps if store.fp_inps is not None else inps.clone()
    prefix = "model.layers"
    t0 = time.time()
    bar = tqdm(range(done + 1, len(layers)), desc=f"{opts.method} layers", unit="layer", disable=not opts.progress,
               initial=done + 1, total=len(layers))
    for i in bar:
        layer = layers[i].to(device)
        kw = _to(kwargs[i], device)
        fp_layer = copy.deepcopy(layer) if fp_inps is not None else None
        for group in _linear_groups(layer, inps, kw, device):
            todo = [(n, f"{prefix}.{i}.{n}.weight") for n in group]
            todo = [(n, w, plan(w, tuple(layer.get_submodule(n).weight.shape))) for n, w in todo]
            if not any(g for _, _, g in todo):
                continue
            H, C = _hessian(layer, group, inps, kw, device, fp_layer, fp_inps)
            for n, wname, grid in todo:
                if grid is not None:
                    _quantize_one(layer.get_submodule(n), wname, grid, quantize, H, opts.method_options, linears, stats,
                                  cross=C)
        inps = _run_layer(layer, inps, kw, device)
        if fp_layer is not None:
            fp_inps = _run_layer(fp_layer, fp_inps, kw, device)
            del fp_layer
        layers[i] = layer.cpu()
        store.save(i, inps, linears, stats, fp_inps)
        bar.set_postfix(s_per_layer=f"{(time.time() - t0) / (i - done):.2f}")
    return _finish(model, plan, linears, stats, opts, meta)


def _quantize_one(mod, wname, grid, quantize, H, method_options, linears, stats, cross=None) -> None:
    W = mod.weight.data.float().clone()  # the original weight, kept for the objective
    grid.check_shape(*W.shape, name=wname)
    if cross is not None:  # asymmetric calibration: the target whose objective on H is ‖Ŵ·X̃ − W·X‖² + const
        W = asym_target(W, H, cross, method_options.get("damp", 0.01))
    ts = time.time()
    res = quantize(W, H, grid, **method_options)
    ql = QuantizedLinear(grid, res.codes.cpu(), {k: v.cpu() for k, v in res.params.items()},
                         None if res.g_idx is None else res.g_idx.cpu())
    Wq = ql.dequant().float()
    mod.weight.data.copy_(Wq.to(mod.weight.device))
    linears[wname] = ql
    stats[wname] = {"seconds": time.time() - ts, "objective": layer_objective(W, Wq.to(W.device), H),
                    "grid": grid.name, **{k: v for k, v in res.stats.items() if isinstance(v, (int, float, str))}}


def _quantize_weights_only(model, plan, quantize, opts, linears, stats) -> None:
    """Methods that need no activations (plain RTN): no calibration forward passes at all."""
    layers = decoder_layers(model)
    for i in tqdm(range(len(layers)), desc=f"{opts.method} layers", unit="layer", disable=not opts.progress):
        for n, mod in layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                wname = f"model.layers.{i}.{n}.weight"
                grid = plan(wname, tuple(mod.weight.shape))
                if grid is not None:
                    _quantize_one(mod, wname, grid, quantize, None, opts.method_options, linears, stats)


def _finish(model, plan, linears, stats, opts, meta):
    _quantize_extra(model, plan, linears, stats)
    sd = model.state_dict()
    tensors = {k: v.detach().float().clone() for k, v in sd.items() if k not in linears}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    config = model.config.to_dict()
    ir = QuantizedModel(config, tensors, linears, dict(meta or {}))
    ir.meta.setdefault("method", opts.method)
    ir.meta.setdefault("method_options", opts.method_options)
    return ir, stats


def _quantize_extra(model, plan: GridPlan, linears: dict, stats: dict) -> None:
    """Token embedding and output head (when the plan asks for them): RTN on their grid, no Hessian."""
    from .quantizers.rtn import quantize_rtn

    tied = getattr(model.config, "tie_word_embeddings", False)
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    sd = dict(model.named_parameters())
    for name in names:
        if name not in sd:
            continue
        W = sd[name].data
        grid = plan(name, tuple(W.shape))
        if grid is None:
            continue
        grid.check_shape(*W.shape, name=name)
        res = quantize_rtn(W.float(), None, grid)
        ql = QuantizedLinear(grid, res.codes, res.params)
        W.copy_(ql.dequant().float())
        linears[name] = ql
        stats[name] = {"seconds": 0.0, "objective": float("nan"), "grid": grid.name, "method": "rtn"}

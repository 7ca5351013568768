"""Real layer problems (Ŵ, H) for layer-level benchmarks: H = 2·XᵀX/n of every decoder linear's input, captured
in one pass of the *original* model over calibration text, so every quantizer solves exactly the same problems.
Linears that read the same tensor (q/k/v, gate/up) share one H object, as in the pipeline."""
from __future__ import annotations

import torch

SHARES = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def capture(model_name: str, nsamples: int, seqlen: int, seed: int = 0, layers: list[int] | None = None):
    """{weight name: (W fp32, H fp32)} for the decoder linears of `layers` (all by default)."""
    from admmq_export.calib import calibration_samples
    from admmq_export.models import load_model
    from admmq_export.paths import shared
    from admmq_export.pipeline import decoder_layers

    lm = load_model(model_name)
    samples = calibration_samples(lm.tokenizer, str(shared("data", "c4-train-00000-first1000.jsonl")), nsamples, seqlen, seed)
    blocks = decoder_layers(lm.model)
    idx = range(len(blocks)) if layers is None else layers
    acc: dict[str, list] = {}
    hooks = []
    for i in idx:
        for n, mod in blocks[i].named_modules():
            leaf = n.rsplit(".", 1)[-1]
            if isinstance(mod, torch.nn.Linear) and leaf not in SHARES:
                key = f"model.layers.{i}.{n}"

                def fn(m, a, o, key=key):
                    x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
                    s = acc.setdefault(key, [torch.zeros(x.shape[1], x.shape[1]), 0])
                    s[0] += x.T @ x
                    s[1] += x.shape[0]

                hooks.append(mod.register_forward_hook(fn))
    with torch.no_grad():
        for s in samples:
            lm.model(s.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    H = {k: 2.0 * v[0] / v[1] for k, v in acc.items()}
    out = {}
    for i in idx:
        for n, mod in blocks[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                head, leaf = n.rsplit(".", 1)
                src = f"model.layers.{i}.{head}.{SHARES.get(leaf, leaf)}"
                out[f"model.layers.{i}.{n}.weight"] = (mod.weight.detach().float().clone(), H[src])
    return out

"""End-to-end tuning of a quantized model's float fields, codes fixed (`--tune-steps N`).

The layer-wise quantizers minimise each linear's own error; what a user measures is the whole model's output.
After the pipeline, this pass adjusts only what the target format stores as floats and the quantizer did not
choose as integers: each grid's floating parameters (GGUF `d`/`dmin`/`m`, GPTQ/Marlin/ONNX group scales; integer
codes, zero points and K-quant sub-scales stay as they are) and the norm weights (stored as float in every
format), to minimise a loss on the calibration windows: `kl` (default), KL(original || quantized) of the
next-token distributions, which pulls the model back towards the original; or `ce`, the next-token cross-entropy
of the calibration text itself (no original model in the loop), which may also move it past the original.
Adam, one window per step; grid fields move by a relative factor (1 + s), norms additively. The result is
rounded to each field's storage dtype, so the IR stays exact and every converter still only packs it.

Guard: the loss (KL, or cross-entropy) on a few held-out calibration windows (not used for steps) is measured
before and after with the exact, stored weights; the tuned fields are kept only if it dropped. Both held-out KL
and cross-entropy are recorded, whichever loss was tuned.
Token embeddings and an untied output head are not tuned.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UserError
from .evaluate import Windows, perplexity
from .ir import QuantizedModel

HELD_OUT = 4  # calibration windows kept for the guard (the last ones)
LOSSES = ("kl", "ce")


def _kl(teacher_lp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(student_logits.float(), -1)
    return (teacher_lp.exp() * (teacher_lp - lp)).sum(-1).mean()


def _heldout(student, teacher, windows: torch.Tensor) -> dict:
    """Mean next-token KL(teacher || student) and cross-entropy (nats) over the windows' positions that have a next
    token (evaluate.perplexity's KLD and NLL)."""
    r = perplexity(student, Windows(windows, 0), reference=teacher)
    return {"kl": r["kld"], "ce": r["nll"]}


def check_options(steps: int, lr: float, nsamples: int, loss: str = "kl") -> None:
    """The CLI's options for this pass (steps 0: off), checked before any work is done."""
    if loss not in LOSSES:
        raise UserError(f"--tune-loss {loss!r} is not a tuning loss", f"use one of: {', '.join(LOSSES)}")
    if steps < 0 or (steps and not lr > 0):
        raise UserError(f"--tune-steps {steps} / --tune-lr {lr}: need a step count >= 0 and a positive rate",
                        "pass e.g. --tune-steps 128 --tune-lr 1e-4, or leave both out")
    if steps and nsamples <= HELD_OUT:
        raise UserError(f"--tune-steps needs more than {HELD_OUT} calibration samples ({HELD_OUT} are held out), "
                        f"got --nsamples {nsamples}", f"use --nsamples {2 * HELD_OUT} or more")


class _Tunable:
    """One quantized linear whose weight is rebuilt from its fixed codes and trainable float fields."""

    def __init__(self, mod: torch.nn.Linear, ql):
        self.mod, self.ql = mod, ql
        self.base = {k: v.float() for k, v in ql.params.items()}
        self.factors = {k: torch.zeros_like(self.base[k], requires_grad=True)
                        for k, v in ql.params.items() if v.is_floating_point()}
        self.codes = ql.codes.float()

    def fields(self) -> dict[str, torch.Tensor]:
        p = dict(self.base)
        for k, s in self.factors.items():
            p[k] = self.base[k] * (1 + s)
        return p

    def install(self):
        def forward(x):
            a, b = self.ql.grid.column_affine(self.fields(), self.codes.shape[1], self.ql.g_idx)
            return F.linear(x, a * self.codes + b, self.mod.bias)

        self.mod.forward = forward

    def store(self):
        """Round the tuned fields to their storage dtype and put the exact weight back in the module."""
        with torch.no_grad():
            tuned = self.fields()
            for k in self.factors:
                self.ql.params[k] = tuned[k].to(self.ql.params[k].dtype)
            del self.mod.forward  # back to nn.Linear.forward
            self.mod.weight.data.copy_(self.ql.dequant().float())


def tune_ir(ir: QuantizedModel, teacher, samples: torch.Tensor, steps: int, lr: float = 1e-4,
            progress: bool = True, loss: str = "kl") -> dict:
    """Tune `ir` in place (float fields of its decoder linears and its norm weights) on `loss` (LOSSES); returns
    statistics."""
    from .fakequant import model_from_ir

    check_options(steps, lr, samples.shape[0], loss)
    if steps == 0:
        raise UserError("tune_ir was asked for 0 steps", "pass --tune-steps N with N >= 1, or leave it out")
    train, held = samples[:-HELD_OUT], samples[-HELD_OUT:]
    teacher = teacher.eval()
    student = model_from_ir(ir)
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    mods = dict(student.named_modules())
    tunables = [_Tunable(mods[k[: -len(".weight")]], ql) for k, ql in ir.linears.items()
                if k.startswith("model.layers.") and k[: -len(".weight")] in mods]
    tunables = [t for t in tunables if t.factors]
    norms = {n: p for n, p in student.named_parameters() if "norm" in n and n in ir.tensors}
    base_norms = {n: p.detach().clone() for n, p in norms.items()}
    before = _heldout(student, teacher, held)
    for t in tunables:
        t.install()
    for p in norms.values():
        p.requires_grad_(True)
    params = [s for t in tunables for s in t.factors.values()] + list(norms.values())
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    t0 = time.time()
    bar = tqdm(range(steps), desc="tune", unit="step", disable=not progress)
    for step in bar:
        ids = train[step % len(train)].unsqueeze(0)
        logits = student(ids, use_cache=False).logits[0]
        if loss == "kl":
            with torch.no_grad():
                tl = F.log_softmax(teacher(ids, use_cache=False).logits[0].float(), -1)
            value = _kl(tl, logits)
        else:
            value = F.cross_entropy(logits[:-1].float(), ids[0, 1:])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value))
        bar.set_postfix({loss: f"{losses[-1]:.4f}"})
    for p in norms.values():
        p.requires_grad_(False)
    originals = [dict(t.ql.params) for t in tunables]  # store() replaces the entries, never writes into them
    for t in tunables:
        t.store()
    after = _heldout(student, teacher, held)
    kept = after[loss] < before[loss]
    if kept:
        for n, p in norms.items():
            ir.tensors[n] = p.detach().float().clone()
    else:  # no gain on the held-out windows: the layer-wise result stands
        for t, orig in zip(tunables, originals):
            t.ql.params.update(orig)
        for n in norms:
            ir.tensors[n] = base_norms[n]
    k = max(1, min(8, steps // 4))
    return {"steps": steps, "lr": lr, "loss": loss, "tensors": len(tunables), "norms": len(norms),
            "fields": sum(s.numel() for t in tunables for s in t.factors.values()),
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "heldout_kl_before": before["kl"], "heldout_kl_after": after["kl"],
            "heldout_ce_before": before["ce"], "heldout_ce_after": after["ce"], "kept": kept,
            "seconds": round(time.time() - t0, 2)}

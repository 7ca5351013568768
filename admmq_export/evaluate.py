"""Perplexity (GPTQ's and llama.cpp's protocols) and KL divergence against a reference model.

- gptq: the whole text tokenized once, non-overlapping windows of `seqlen`, every next token scored.
- llamacpp: llama-perplexity's protocol: chunks of `seqlen` (default 512) tokens, the first token of each chunk
  replaced by BOS when the tokenizer adds one, only the second half of each chunk scored.
KLD: mean over scored positions of KL(P_reference || P_model) of the next-token distributions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calib import bos_id, load_texts
from .errors import UserError


@dataclass
class Windows:
    ids: torch.Tensor  # [n, L]
    first: int  # first position whose logits are scored (predicting token first+1)


def eval_windows(tokenizer, path, protocol: str = "gptq", seqlen: int | None = None, max_windows: int | None = None) -> Windows:
    text = "\n\n".join(load_texts(path))
    if protocol == "gptq":
        L = seqlen or 2048
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        first = 0
    elif protocol == "llamacpp":
        L = seqlen or 512
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        first = L // 2
    else:
        raise UserError(f"unknown protocol {protocol!r}", "use --protocol gptq or llamacpp")
    n = ids.numel() // L
    if n == 0:
        raise UserError(f"{path} has {ids.numel()} tokens, fewer than one window of {L}", "use a smaller --seqlen")
    if max_windows:
        n = min(n, max_windows)
    win = ids[: n * L].reshape(n, L).clone()
    bos = bos_id(tokenizer)  # by behaviour: the IR's reloaded Gemma-3 tokenizer says add_bos_token=False (ppl 20 -> 31)
    if protocol == "llamacpp" and bos is not None:
        win[:, 0] = bos
    return Windows(win, first)


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    logits = model(ids.unsqueeze(0), use_cache=False).logits[0, first:-1].float()
    return F.log_softmax(logits, -1)


@torch.no_grad()
def perplexity(model, windows: Windows, reference=None, progress: bool = False) -> dict:
    """{'ppl', 'nll', 'tokens'[, 'kld']}; `reference` is a model whose distribution KLD is measured against."""
    nll, count, kld = 0.0, 0, 0.0
    model.eval()
    for w in tqdm(windows.ids, desc="eval", disable=not progress):
        lp = _logprobs(model, w, windows.first)
        tgt = w[windows.first + 1 :]
        nll += float(-lp.gather(-1, tgt.unsqueeze(-1)).sum(dtype=torch.float64))
        count += tgt.numel()
        if reference is not None:
            ref = _logprobs(reference, w, windows.first)
            kld += float((ref.exp() * (ref - lp)).sum(dtype=torch.float64))
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": int(windows.ids.shape[0])}
    if reference is not None:
        out["kld"] = kld / count
    return out

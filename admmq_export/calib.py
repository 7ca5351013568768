"""Calibration and evaluation text: .txt, .jsonl (`text` field) or .parquet (`text` column)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError


def load_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration/evaluation file {path} not found", "pass an existing .txt, .jsonl or .parquet file")
    try:
        if path.suffix == ".jsonl":
            texts = [json.loads(line).get("text", "") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            texts = [t or "" for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
        else:
            texts = [path.read_text(encoding="utf-8")]
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e})", "pass a .txt, .jsonl with a `text` field, or .parquet with a `text` column") from e
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{path} contains no text", "pass a file with calibration text in it")
    return texts


def token_stream(tokenizer, texts: list[str], limit: int | None = None) -> torch.Tensor:
    """All texts tokenized and concatenated (documents separated by a blank line)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if limit and len(ids) >= limit:
            break
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts BOS in front of a text, else None. Judged by what it does, not by its
    `add_bos_token` attribute: a tokenizer saved and reloaded (the IR's) can report False and still add BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibration_samples(tokenizer, path, nsamples: int, seqlen: int, seed: int, bos: bool = True) -> torch.Tensor:
    """nsamples random windows of seqlen tokens, [nsamples, seqlen], reproducible for a seed. With `bos`, and a
    tokenizer that adds BOS, the first token of every window is replaced by BOS, as llama.cpp's perplexity and
    imatrix tools do: a model sees BOS at position 0 whenever it runs, and models that park attention on it
    (Gemma-3) have activations there that windows cut from mid-text never show."""
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"calibration needs ≥1 sample of ≥2 tokens (got {nsamples} x {seqlen})", "raise --nsamples/--seqlen")
    texts = load_texts(path)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    stream = token_stream(tokenizer, [texts[i] for i in order], limit=max(4 * nsamples * seqlen, 65536))
    if stream.numel() <= seqlen:
        raise UserError(f"calibration file {path} has only {stream.numel()} tokens, fewer than --seqlen {seqlen}",
                        "use a larger calibration file or a smaller --seqlen")
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=g)
    win = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    b = bos_id(tokenizer) if bos else None
    if b is not None:
        win[:, 0] = b
    return win

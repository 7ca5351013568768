"""`--to gguf[:TYPE]`: a llama.cpp-loadable GGUF written from the IR's codes (formats.md §1).

* Per-tensor types follow llama.cpp's presets and shape fallbacks (gguf_presets.py; default `q4_k_m`), so the
  quantizers optimise on exactly the GGUF grid each tensor gets (token_embd/output included); every fallback is
  reported. `--fallback` does not apply: llama.cpp's own fallback types always do.
* Quantized tensors: the codes and block fields are packed verbatim (gguf_pack.py), never re-rounded; other tensors
  are F32 (1-D and norms) or the preset's float type (F16/BF16 presets, F16 shape fallback).
* Metadata and tokenizer: gguf_meta.py; layout (names, llama's Q/K row order, gemma3's norm + 1): gguf_layout.py.
* Written with gguf-py's GGUFWriter (header, KV pairs, tensor data and alignment are its own).

Also registers the runtime loader: llama.cpp itself (llama-cpp-python) runs a written file for `admmq-export eval`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from admmq_export.errors import UserError
from admmq_export.grids import GGUF_GRIDS
from admmq_export.runtime import register_loader

from . import register
from .base import Converter, QuantOptions
from .gguf_layout import gguf_name, ordered_names, row_permutation, to_file_layout
from .gguf_meta import add_hparams, add_tokenizer, gguf_arch, model_info
from .gguf_pack import pack
from .gguf_presets import FLOAT_TYPES, PRESETS, TYPE_NAMES, parse, tensor_type


def float_array(x: torch.Tensor, t: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """A float tensor in the file's type: (array for GGUFWriter.add_tensor, raw_dtype)."""
    if t == "F16" and x.ndim > 1:
        return x.to(torch.float16).numpy(), None
    if t == "BF16" and x.ndim > 1:
        raw = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(*x.shape[:-1], x.shape[-1] * 2), GGMLQuantizationType.BF16
    return x.float().numpy(), None


def file_value(x: torch.Tensor, t: str) -> torch.Tensor:
    """The fp32 value llama.cpp reads back for a float tensor written as type t."""
    if t == "F16" and x.ndim > 1:
        return x.to(torch.float16).float()
    if t == "BF16" and x.ndim > 1:
        return x.to(torch.bfloat16).float()
    return x.float()


class GGUFConverter(Converter):
    name = "gguf"
    output_is_dir = False
    grid_kind = "gguf"
    types = tuple(TYPE_NAMES)

    def plan(self, typ, q: QuantOptions, config: dict | None = None):
        return self.planned(typ, q, "error", config)

    def planned(self, typ, q: QuantOptions, mode: str = "error", config: dict | None = None):
        preset = parse(typ)
        report: dict[str, str] = {}

        def plan(name: str, shape: tuple):
            if config is None:  # before the model is known: validation only
                return None
            g = gguf_name(name, config)
            if g is None:
                return None
            t, note = tensor_type(preset, g, shape, model_info(config))
            if note:
                report[name] = note
            return None if t in FLOAT_TYPES else GGUF_GRIDS[t]

        plan.fallbacks = report  # type: ignore[attr-defined]
        return plan

    def write(self, ir, tmp_out: Path, typ):
        config = ir.config
        arch = gguf_arch(config)
        preset = parse(typ)
        info = model_info(config)
        w = GGUFWriter(str(tmp_out), arch)
        add_hparams(w, config, arch, preset.ftype, quantized=not preset.is_float, name=ir.meta.get("source"))
        tok = add_tokenizer(w, ir.gguf_tokenizer, ir.tokenizer_dir)
        counts: dict[str, int] = {}
        pairs = ordered_names([*ir.tensors, *ir.linears], config)
        if not pairs:
            raise UserError("no tensor of the IR maps to a GGUF tensor name", "export a supported architecture")
        for hf, g in pairs:
            if hf in ir.linears:
                ql = ir.linears[hf]
                t = ql.grid.spec().get("type")
                if ql.grid.family != "gguf" or t is None:
                    raise UserError(f"{hf} is quantized on grid {ql.grid.name}, which GGUF cannot store",
                                    "re-export with --to gguf:TYPE so the quantizer works on the GGUF grid")
                codes, params = ql.codes, ql.params
                perm = row_permutation(g, codes.shape[0], config)
                if perm is not None:
                    idx = torch.from_numpy(perm)
                    codes, params = codes[idx], {k: v[idx] for k, v in params.items()}
                w.add_tensor(g, pack(t, codes, params), raw_dtype=GGMLQuantizationType[t])
            else:
                x = to_file_layout(g, ir.tensors[hf], config)
                t, _ = tensor_type(preset, g, tuple(x.shape), info)
                if t not in FLOAT_TYPES:
                    raise UserError(f"{hf} should be {t} in {preset.name} but the IR keeps it in float",
                                    "re-export with --to gguf:TYPE so every tensor is quantized on its GGUF grid")
                arr, raw = float_array(x, t)
                w.add_tensor(g, arr, raw_dtype=raw)
            counts[t] = counts.get(t, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return {"gguf types": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), "tokenizer": tok}

    def support(self):
        rows = []
        for t, grid in GGUF_GRIDS.items():
            name = t.lower()
            sub = f" ({grid.sub_size}-column sub-blocks)" if grid.sub_size and grid.sub_size != grid.group_size else ""
            notes = (f"llama.cpp preset (mixture, see below); {name}-pure: {t} for every tensor" if name in PRESETS
                     else f"{t} for every quantizable tensor (llama-quantize --pure), shape fallbacks apply")
            rows.append({"format": f"gguf:{name}", "bits": str(grid.bits), "group_size": f"{grid.group_size}{sub}",
                         "sym": "sym (code offset)" if hasattr(grid, "offset") else "min (float offset)",
                         "dequant": "fp32 (ggml to_float)", "notes": notes})
        rows.append({"format": "gguf:q2_k|q3_k_s|q3_k_m|q3_k_l|q4_k_s|q4_k_m|q5_k_s|q5_k_m|q6_k|q8_0|q4_0|...",
                     "bits": "mixed", "group_size": "per type", "sym": "per type", "dequant": "fp32",
                     "notes": "llama.cpp preset rules per tensor (token_embd/output included), llama.cpp shape fallbacks"})
        rows.append({"format": "gguf:f32|f16|bf16", "bits": "32/16", "group_size": "-", "sym": "-", "dequant": "-",
                     "notes": "unquantized"})
        return rows


register(GGUFConverter())


# ---- runtime: llama.cpp through llama-cpp-python ----------------------------------------------------------
class _Out:
    def __init__(self, logits):
        self.logits = logits


class LlamaCppLM:
    """`model(ids[1, T], use_cache=False).logits` computed by llama.cpp (all-token logits, fresh context per call;
    the context grows when a sequence is longer than `n_ctx`)."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise UserError("llama-cpp-python is not installed, so a GGUF file cannot be run",
                            "pip install 'admmq-export[runtimes]' (or evaluate the .ir folder beside it)") from e
        import os

        self.path, self.threads = str(path), threads or max(1, os.cpu_count() or 1)
        self.llm = self._open(n_ctx)

    def _open(self, n_ctx: int):
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        return Llama(model_path=self.path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                     n_threads=self.threads)

    def eval(self):
        return self

    def __call__(self, input_ids, use_cache=False, **_):
        ids = torch.as_tensor(input_ids)
        if ids.shape[0] != 1:
            raise ValueError("llama.cpp runner takes one sequence at a time")
        toks = ids[0].tolist()
        if len(toks) > self.n_ctx:
            self.llm.close()
            self.llm = self._open(len(toks))
        self.llm.reset()
        self.llm.eval(toks)
        scores = np.array(self.llm.scores[: len(toks)], dtype=np.float32, copy=True)
        return _Out(torch.from_numpy(scores).unsqueeze(0))


def is_gguf_output(path: Path) -> bool:
    from admmq_export.fakequant import ir_path_for, is_ir_dir

    return Path(path).suffix == ".gguf" and Path(path).is_file() and is_ir_dir(ir_path_for(Path(path)))


def load_gguf_output(path: Path):
    from admmq_export.fakequant import ir_path_for, tokenizer_from_ir
    from admmq_export.ir import QuantizedModel

    return LlamaCppLM(path), tokenizer_from_ir(QuantizedModel.load(ir_path_for(Path(path))))


register_loader(is_gguf_output, load_gguf_output)

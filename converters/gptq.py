"""`--to gptq[:v1|v2]` and `--to marlin`: Hugging Face GPTQ checkpoints (formats.md §2) that transformers
(GPTQModel backend), GPTQModel, vLLM and SGLang load unmodified.

* Per quantized linear: `qweight` int32 [K·bits/32, N], `qzeros` int32 [G, N·bits/32], `scales` fp16 [G, N],
  `g_idx` int32 [K] (act-order: from the IR), packed by gptq_pack.py from the IR's codes (never re-rounded).
  The grid is GptqGrid/MarlinGrid: fp16 scales, integer zero points, dequantized by every GPTQ kernel as
  `fp16(s·(q − z))`, which is what our IR evaluates.
* Zero points: v1 (`checkpoint_format: gptq`) stores z − 1 and is written only when every z ≥ 1 (always for
  symmetric grids); an asymmetric grid with some z = 0 is written as v2 (`gptq_v2`, raw z), never wrapped.
  `--to gptq:v1` with z = 0 present is refused; `--to gptq:v2` forces v2.
* `--to marlin`: symmetric 4/8-bit (uint4b8/uint8b128), groups −1/32/64/128, act-order through g_idx, saved as
  plain GPTQ v1 that Marlin repacks at load (a pre-repacked Marlin file would run on nothing else, §2.6).
* Other tensors in fp16 (as GPTQModel saves), `config.json` with `quantization_config`, `quantize_config.json`,
  tokenizer files; shards above `max_shard_bytes` with `model.safetensors.index.json`.
* Layers kept in fp16 (`--fallback keep`) are excluded twice: GPTQModel/vLLM read `dynamic` ("-:regex"),
  transformers reads `modules_in_block_to_quantize` (see block_modules).
* The export report carries the kernel pre-flight summary (gptq_kernels.py).

Also registers the runtime loader for written checkpoints (see load_gptq).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from admmq_export.errors import UserError
from admmq_export.grids import int_grid
from admmq_export.runtime import register_loader

from . import register
from .base import Converter, QuantOptions, is_decoder_linear
from .gptq_kernels import preflight, summary
from .gptq_pack import pack_cols, pack_rows


def linear_tensors(ql, fmt: str) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of one QuantizedLinear."""
    g = ql.grid
    bits = g.bits
    codes = ql.codes.numpy()  # [N, K]
    scale = ql.params["scale"][..., 0].to(torch.float16)  # [N, G]
    zero = ql.params["zero"][..., 0].numpy().astype(np.int64)  # [N, G]
    if fmt == "v1":
        if (zero < 1).any():
            raise UserError("zero point 0 cannot be stored in GPTQ v1 (its z − 1 field would wrap)",
                            "use --to gptq (chooses v2 automatically) or --to gptq:v2")
        zero = zero - 1
    return {"qweight": torch.from_numpy(pack_rows(codes.T, bits)),
            "qzeros": torch.from_numpy(pack_cols(zero.T.astype(np.uint8), bits)),
            "scales": scale.T.contiguous(),
            "g_idx": ql.g_idx_or_default().to(torch.int32).contiguous()}


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> int:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than max_bytes."""
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nb > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k].contiguous()
        size += nb
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return 1
    wmap, total = {}, 0
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / fname), metadata=meta)
        for k, v in sh.items():
            wmap[k] = fname
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
    return len(shards)


def block_modules(linears, kept: list[str]) -> dict:
    """Layer exclusions for transformers: its GPTQ loader (optimum's GPTQQuantizer.convert_model) ignores GPTQModel's
    `dynamic` and replaces every block linear unless `modules_in_block_to_quantize` lists the quantized ones by
    block-relative name (matched with str.endswith). Written only when some decoder linear is kept and the names
    separate the two sets (the same modules quantized in every block)."""
    if not kept:
        return {}
    rel = sorted({re.sub(r"^.*?\.layers\.\d+\.", "", n[: -len(".weight")]) for n in linears})
    if any(k.endswith(r) for k in kept for r in rel):
        return {}
    return {"modules_in_block_to_quantize": [rel]}


class GptqConverter(Converter):
    name = "gptq"
    output_is_dir = True
    grid_kind = "gptq"
    types = (None, "v1", "v2")
    max_shard_bytes = 4 * 2**30
    tp = 1

    def plan(self, typ, q: QuantOptions):
        if typ not in self.types:
            raise UserError(f"unknown GPTQ checkpoint format {typ!r}", "use --to gptq, gptq:v1 or gptq:v2")
        if q.bits not in (2, 3, 4, 8):
            raise UserError(f"GPTQ checkpoints hold 2/3/4/8-bit codes, not {q.bits}", "use --bits 2, 3, 4 or 8")
        return super().plan(typ, q)

    def planned(self, typ, q: QuantOptions, mode: str = "error", config: dict | None = None):
        """Base plan plus GPTQ's own shape rule: codes fill whole int32 words along K (K·bits % 32 == 0; 3-bit:
        K % 32 == 0). A layer that breaks it, or whose in-dim the group does not divide, can only stay in fp16
        (`--fallback keep`, written as a plain weight and excluded through `dynamic`); per-channel fallback would
        mix group sizes, which one `quantization_config` cannot describe."""
        base = super().planned(typ, q, mode)
        if mode == "per-channel":
            raise UserError("a GPTQ checkpoint has one group size for every quantized layer",
                            "use --fallback keep (such layers stay fp16) or a group size dividing every in-dim")

        def plan(name, shape):
            grid = base(name, shape)
            if grid is None:
                return None
            bad = [f"{what} {d}" for what, d in (("in-dim", shape[1]), ("out-dim", shape[0]))
                   if (d * grid.bits) % 32 or (grid.bits == 3 and d % 32)]
            if bad:
                if mode != "keep":
                    raise UserError(f"{name}: {' and '.join(bad)} x {grid.bits} bits does not fill whole int32 words, "
                                    "which GPTQ's qweight/qzeros need", "use --fallback keep (the layer stays fp16)")
                base.fallbacks[name] = f"{' and '.join(bad)} cannot be packed at {grid.bits} bits: kept in fp16 (dynamic exclusion)"
                return None
            return grid

        plan.fallbacks = base.fallbacks  # type: ignore[attr-defined]
        return plan

    def _format(self, ir, typ) -> str:
        if typ is not None:
            return typ
        zmin = min((int(q.params["zero"].min()) for q in ir.linears.values()), default=1)
        return "v1" if zmin >= 1 else "v2"

    def write(self, ir, tmp_out: Path, typ):
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        fmt = self._format(ir, typ)
        grids = {q.grid for q in ir.linears.values()}
        if not ir.linears:
            raise UserError("the IR has no quantized linear", "export with --to gptq so the decoder linears are quantized")
        if len({(g.bits, g.group_size, g.sym) for g in grids}) != 1 or any(g.family != "int" or g.runtime != "fp16" for g in grids):
            raise UserError(f"GPTQ checkpoints need one GPTQ grid for every linear, got {sorted(g.name for g in grids)}",
                            "re-export with --to gptq (or --to marlin)")
        grid = next(iter(grids))
        tensors: dict[str, torch.Tensor] = {}
        for name, ql in ir.linears.items():
            if not is_decoder_linear(name):
                raise UserError(f"{name} is quantized, but GPTQ checkpoints quantize decoder linears only", "re-export")
            prefix = name[: -len(".weight")]
            for k, v in linear_tensors(ql, fmt).items():
                tensors[f"{prefix}.{k}"] = v
        for k, v in ir.tensors.items():
            tensors[k] = v.to(torch.float16)
        n_shards = save_sharded(tensors, tmp_out, self.max_shard_bytes)
        act_order = any(q.g_idx is not None for q in ir.linears.values())
        kept = sorted(k[: -len(".weight")] for k in ir.tensors if is_decoder_linear(k))
        qcfg = {"quant_method": "gptq", "bits": grid.bits, "group_size": grid.group_size or -1, "desc_act": act_order,
                "sym": grid.sym, "static_groups": bool(ir.meta.get("method_options", {}).get("static_groups", False)),
                "true_sequential": True, "damp_percent": ir.meta.get("method_options", {}).get("damp", 0.01),
                "lm_head": False, "checkpoint_format": "gptq" if fmt == "v1" else "gptq_v2",
                "format": "gptq" if fmt == "v1" else "gptq_v2", "pack_dtype": "int32",
                **({"dynamic": {f"-:{k.replace('.', '[.]')}$": {} for k in kept}} if kept else {}),
                **block_modules(ir.linears, kept),
                "meta": {"quantizer": [f"admmq-export:{ir.meta.get('admmq_export_version', '')}"],
                         "method": ir.meta.get("method"), "method_options": ir.meta.get("method_options", {})}}
        config = dict(ir.config)
        config.update({"quantization_config": qcfg, "torch_dtype": "float16", "dtype": "float16"})
        (tmp_out / "config.json").write_text(json.dumps(config, indent=1, default=str))
        (tmp_out / "quantize_config.json").write_text(json.dumps(qcfg, indent=1, default=str))
        if ir.tokenizer_dir and Path(ir.tokenizer_dir).is_dir():
            for f in Path(ir.tokenizer_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp_out / f.name)
        pre = [preflight(n, q.shape, grid.bits, grid.group_size, grid.sym, q.g_idx is not None, self.tp)
               for n, q in sorted(ir.linears.items())]
        return {"checkpoint_format": qcfg["checkpoint_format"], "shards": n_shards, "kernels": summary(pre)}

    def support(self):
        return [{"format": "gptq[:v1|v2]", "bits": "2,3,4,8", "group_size": "-1, any divisor of in-dim", "sym": "sym, asym",
                 "dequant": "fp16(s·(q−z))", "notes": "v1 when every z ≥ 1 (always for sym), else v2; act-order via g_idx"}]


class MarlinConverter(GptqConverter):
    name = "marlin"
    grid_kind = "marlin"
    types = (None,)

    def plan(self, typ, q: QuantOptions):
        if typ is not None:
            raise UserError(f"--to marlin takes no type (got {typ!r})", "use --to marlin")
        g = -1 if q.group_size in (0, -1) else q.group_size
        if q.bits not in (4, 8) or not q.sym or g not in (-1, 32, 64, 128):
            raise UserError(f"Marlin runs symmetric 4/8-bit grids with group -1/32/64/128, not "
                            f"{q.bits}-bit {'sym' if q.sym else 'asym'} group {g}",
                            "use --bits 4 --sym --group-size 128 (or --to gptq for other grids)")
        grid = int_grid("marlin", q.bits, q.group_size, True)

        def plan(name, shape):
            return grid if is_decoder_linear(name) else None

        return plan

    def _format(self, ir, typ):
        return "v1"

    def support(self):
        return [{"format": "marlin", "bits": "4,8", "group_size": "-1,32,64,128", "sym": "sym",
                 "dequant": "fp16(s·(q−8|128))", "notes": "plain GPTQ v1 that Marlin repacks at load; needs in%128, out%64"}]


register(GptqConverter())
register(MarlinConverter())


# ---- runtime: the written checkpoint, rebuilt from its own tensors ------------------------------------------
def is_gptq_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == "gptq"
    except ValueError:
        return False


def load_gptq(path: Path):
    """A transformers model whose linears hold the checkpoint's weights, dequantized from qweight/qzeros/scales/g_idx
    by our independent reader (kernels_check/gptq.py) in the kernels' arithmetic fp16(s·(q−z)), computed in fp32.
    (transformers' own GPTQ loading needs the gptqmodel package, which has no CPU build here.)"""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kernels_check.gptq import read_checkpoint

    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("transformers_version", "torch_dtype", "dtype")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights, plain = read_checkpoint(Path(path))
    sd = {k: v.float() for k, v in plain.items()}
    sd.update({k: v.float() for k, v in weights.items()})
    missing, _ = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise UserError(f"GPTQ checkpoint {path} lacks {missing[:3]}", "load a complete checkpoint")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


register_loader(is_gptq_dir, load_gptq)

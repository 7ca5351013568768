"""QuantizedModel: the intermediate representation every converter and every check reads.

On disk (a folder): `ir.safetensors` (float tensors by their HF name; per quantized linear `<w>.codes`,
`<w>.param.<k>`, optional `<w>.g_idx`), `ir.json` (config, grids, metadata, manifest of sha256 hashes),
`tokenizer/` (the HF tokenizer files) and `gguf_tokenizer.json` (the tokenizer.* metadata of a GGUF source).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .grids import Grid, from_spec
from .paths import atomic_path

IR_VERSION = 1


def sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class QuantizedLinear:
    grid: Grid
    codes: torch.Tensor  # uint8 [out, in], original column order
    params: dict[str, torch.Tensor]  # each [out, n_units, k], storage dtype
    g_idx: torch.Tensor | None = None  # int32 [in]: column -> unit (act-order); None: column // group

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def dequant(self) -> torch.Tensor:
        """The weight in the target runtime's exact arithmetic (fp32 or fp16)."""
        return self.grid.dequant(self.codes, self.params, self.g_idx)

    def g_idx_or_default(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.int()
        return (torch.arange(self.codes.shape[1]) // self.grid.unit(self.codes.shape[1])).int()


@dataclass
class QuantizedModel:
    config: dict  # HF config as a dict
    tensors: dict[str, torch.Tensor]  # everything not quantized, fp32, by HF state-dict name
    linears: dict[str, QuantizedLinear]  # by HF weight name, e.g. model.layers.0.mlp.up_proj.weight
    meta: dict = field(default_factory=dict)  # method, hyper-parameters, calibration, source, seed
    tokenizer_dir: Path | None = None
    gguf_tokenizer: dict | None = None

    @property
    def arch(self) -> str:
        return self.config["model_type"]

    def dequant_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        sd = {k: v.to(dtype) for k, v in self.tensors.items()}
        sd.update({k: q.dequant().to(dtype) for k, q in self.linears.items()})
        return sd

    def manifest(self) -> dict:
        out = {}
        for k, q in sorted(self.linears.items()):
            out[k] = {"grid": q.grid.name, "codes_sha256": sha256_tensor(q.codes), "dequant_sha256": sha256_tensor(q.dequant())}
        for k, t in sorted(self.tensors.items()):
            out[k] = {"sha256": sha256_tensor(t)}
        return out

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike) -> Path:
        out = Path(out)
        with atomic_path(out, directory=True) as tmp:
            self._write(tmp)
        return out

    def _write_new(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=False)
        self._write(d)

    def _write(self, d: Path) -> None:
        flat = {k: v.contiguous() for k, v in self.tensors.items()}
        lin = {}
        for k, q in self.linears.items():
            flat[f"{k}.codes"] = q.codes.contiguous()
            for p, t in q.params.items():
                flat[f"{k}.param.{p}"] = t.contiguous()
            if q.g_idx is not None:
                flat[f"{k}.g_idx"] = q.g_idx.int().contiguous()
            lin[k] = {"grid": q.grid.spec(), "params": sorted(q.params)}
        save_file(flat, str(d / "ir.safetensors"), metadata={"format": "admmq-ir"})
        doc = {"ir_version": IR_VERSION, "config": self.config, "linears": lin, "meta": self.meta,
               "manifest": self.manifest()}
        (d / "ir.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        if self.gguf_tokenizer is not None:
            (d / "gguf_tokenizer.json").write_text(json.dumps(self.gguf_tokenizer))
        if self.tokenizer_dir is not None and Path(self.tokenizer_dir).is_dir():
            import shutil

            shutil.copytree(self.tokenizer_dir, d / "tokenizer")

    @classmethod
    def load(cls, d: str | os.PathLike) -> "QuantizedModel":
        d = Path(d)
        if not (d / "ir.json").is_file() or not (d / "ir.safetensors").is_file():
            raise UserError(f"{d} is not an admmq-export IR folder (ir.json/ir.safetensors missing)",
                            "pass a folder written with --to ir")
        try:
            doc = json.loads((d / "ir.json").read_text())
            flat = load_file(str(d / "ir.safetensors"))
        except Exception as e:  # corrupt file
            raise UserError(f"IR folder {d} is corrupt ({type(e).__name__}: {e})", "re-run the export") from e
        linears = {}
        for k, info in doc["linears"].items():
            params = {p: flat.pop(f"{k}.param.{p}") for p in info["params"]}
            linears[k] = QuantizedLinear(from_spec(info["grid"]), flat.pop(f"{k}.codes"), params,
                                         flat.pop(f"{k}.g_idx", None))
        gt = d / "gguf_tokenizer.json"
        tok = d / "tokenizer"
        qm = cls(doc["config"], flat, linears, doc.get("meta", {}), tok if tok.is_dir() else None,
                 json.loads(gt.read_text()) if gt.is_file() else None)
        qm.stored_manifest = doc.get("manifest", {})
        return qm

    def verify_manifest(self) -> list[str]:
        """Names whose recomputed hashes differ from the stored manifest (empty: intact)."""
        stored = getattr(self, "stored_manifest", {})
        now = self.manifest()
        return [k for k in now if stored.get(k) != now[k]]

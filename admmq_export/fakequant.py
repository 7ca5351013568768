"""Build a runnable torch model from an IR (the fake-quant model every evaluation and check compares to)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .ir import QuantizedModel


def model_from_ir(ir: QuantizedModel, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ir.config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = ir.dequant_state_dict(dtype)
    missing = [k for k, _ in model.named_parameters() if k not in sd and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise UserError(f"IR lacks tensors {missing[:3]}...", "re-run the export")
    model.load_state_dict(sd, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def tokenizer_from_ir(ir: QuantizedModel):
    from transformers import AutoTokenizer

    if ir.tokenizer_dir is None:
        raise UserError("IR has no tokenizer folder", "re-run the export (it saves the tokenizer)")
    return AutoTokenizer.from_pretrained(str(ir.tokenizer_dir))


def is_ir_dir(path: str | Path) -> bool:
    return (Path(path) / "ir.json").is_file()


def ir_path_for(output: str | Path) -> Path:
    """Where the IR of a written output lives: the output itself (--to ir) or `<output>.ir`."""
    p = Path(output)
    return p if is_ir_dir(p) else p.with_name(p.name + ".ir")

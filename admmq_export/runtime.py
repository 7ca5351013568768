"""Load a model, an IR, or a written output for evaluation: each format through its own loader registry."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .fakequant import is_ir_dir, model_from_ir, tokenizer_from_ir

# format name -> function(path) -> (model-like callable with .logits, tokenizer); converters register here
RUNTIME_LOADERS: dict = {}


def register_loader(detect, load):
    RUNTIME_LOADERS[detect] = load


def load_for_eval(path: str):
    from .ir import QuantizedModel
    from .models import load_model

    if is_ir_dir(path):
        ir = QuantizedModel.load(path)
        return model_from_ir(ir), tokenizer_from_ir(ir)
    import converters

    converters._load_all()
    for detect, load in RUNTIME_LOADERS.items():
        if detect(Path(path)):
            return load(Path(path))
    lm = load_model(path)
    return lm.model, lm.tokenizer

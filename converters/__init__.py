"""Format registry: IR -> file. Each converter names the grids it accepts (its plan) and packs codes."""
from __future__ import annotations

from admmq_export.errors import UserError
from admmq_export.plugins import load_modules

from .base import Converter

CONVERTERS: dict[str, Converter] = {}
_MODULES = ("ir", "gguf", "gptq", "onnx")


def register(conv: Converter) -> Converter:
    CONVERTERS[conv.name] = conv
    return conv


def _load_all() -> None:
    load_modules(__name__, _MODULES)


def get_converter(target: str) -> tuple[Converter, str | None]:
    """'gguf:q4_k_m' -> (gguf converter, 'q4_k_m')."""
    _load_all()
    fmt, _, typ = target.partition(":")
    if fmt not in CONVERTERS:
        raise UserError(f"unknown output format {fmt!r}", f"use --to one of {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[fmt], (typ or None)


def all_converters() -> list[Converter]:
    _load_all()
    return list(CONVERTERS.values())

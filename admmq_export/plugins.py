"""Plug-in loading shared by the registries (quantizers, converters, checkers)."""
from __future__ import annotations

import importlib


def load_modules(package: str, names: tuple[str, ...]) -> None:
    """Import package.name for each name, so it registers itself; a module that is absent is skipped,
    while a missing dependency inside a present module is raised as it is."""
    for name in names:
        try:
            importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise

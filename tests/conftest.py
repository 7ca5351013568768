import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from admmq_export.paths import shared  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

STORIES = shared("models", "stories260K", "stories260K-f32.gguf")
TINY_TEXT = shared("data", "tinystories-sample.txt")


@pytest.fixture(scope="session")
def stories():
    if not STORIES.is_file():
        pytest.skip(f"shared model missing: {STORIES}")
    from admmq_export.models import load_model

    return load_model(str(STORIES))


def export_args(out, *extra, method="rtn", to="ir", bits=4, group=32):
    return ["stories260k", "--to", to, "-o", str(out), "--method", method, "--bits", str(bits), "--group-size", str(group),
            "--fallback", "per-channel", "--calib", str(TINY_TEXT), "--nsamples", "8", "--seqlen", "64", "--quiet", *extra]

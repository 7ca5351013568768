"""`python -m kernels_check.slice OUT DEST --keep REGEX`: a small copy of a written file and its IR that holds only
the quantized linears whose HF names match REGEX, so that a GPU host with a transfer limit can run
`admmq-export check DEST --gpu` on real files. Each kept tensor's bytes are copied verbatim from OUT (GPTQ
folder: its qweight/qzeros/scales/g_idx/bias; GGUF: its raw blocks); nothing is re-packed or re-quantized. The
sliced IR keeps the config, meta and the kept linears (codes, parameters, g_idx) and drops every float tensor.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from admmq_export.fakequant import ir_path_for
from admmq_export.ir import QuantizedModel


def slice_ir(ir: QuantizedModel, keep: str) -> QuantizedModel:
    pat = re.compile(keep)
    linears = {k: q for k, q in ir.linears.items() if pat.search(k)}
    if not linears:
        raise SystemExit(f"no quantized linear of the IR matches {keep!r}")
    return QuantizedModel(ir.config, {}, linears, {**ir.meta, "sliced": keep})


def _slice_gptq(src: Path, dest: Path, ir: QuantizedModel) -> None:
    from safetensors.torch import save_file

    from .gptq import _tensors

    prefixes = tuple(k[: -len("weight")] for k in ir.linears)
    t = {k: v.contiguous() for k, v in _tensors(src).items() if k.startswith(prefixes)}
    dest.mkdir(parents=True)
    for f in ("config.json", "quantize_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
    save_file(t, str(dest / "model.safetensors"), metadata={"format": "pt"})


def _slice_gguf(src: Path, dest: Path, ir: QuantizedModel) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    from .gguf import _ir_values

    want = _ir_values(ir)
    reader = GGUFReader(str(src))
    arch = ir.config.get("model_type", "llama")
    w = GGUFWriter(str(dest), arch)
    n = 0
    for t in reader.tensors:
        if t.name not in want:
            continue
        qt = GGMLQuantizationType(int(t.tensor_type))
        rows = int(np.prod(t.shape.tolist()[1:]))
        w.add_tensor(t.name, np.asarray(t.data).view(np.uint8).reshape(rows, -1), raw_dtype=qt)
        n += 1
    if n != len(want):
        raise SystemExit(f"{src}: {len(want) - n} kept IR tensors are missing from the file")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def slice_output(src: Path, dest: Path, keep: str) -> None:
    src, dest = Path(src), Path(dest)
    ir = slice_ir(QuantizedModel.load(ir_path_for(src)), keep)
    if src.suffix == ".gguf":
        _slice_gguf(src, dest, ir)
    else:
        from converters.gptq import is_gptq_dir

        if not is_gptq_dir(src):
            raise SystemExit(f"{src}: neither a GGUF file nor a GPTQ folder")
        _slice_gptq(src, dest, ir)
    ir.save(ir_path_for(dest))
    (dest.parent / f"{dest.name}.slice.json").write_text(json.dumps({"source": str(src), "keep": keep,
                                                                     "linears": sorted(ir.linears)}, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels_check.slice", description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="a GPTQ folder or .gguf file written by admmq-export (its .ir beside it)")
    ap.add_argument("dest")
    ap.add_argument("--keep", required=True, help="regex on HF linear names, e.g. 'layers\\.0\\.'")
    a = ap.parse_args(argv)
    slice_output(Path(a.output), Path(a.dest), a.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

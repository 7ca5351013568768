"""`--to onnx` (QDQ: opset-21 blocked DequantizeLinear + MatMul) and `--to onnx:matmulnbits` (com.microsoft.MatMulNBits).

The whole decoder LM (input_ids, attention_mask, position_ids -> logits, no KV cache) is traced from our
fake-quant torch model and every quantized decoder linear is stored packed (onnx_pack.py, formats.md §3).
Grid: IntGrid "int" (fp16-valued scale, integer zero point, fp32 runtime `s·(q − z)`), which both forms
dequantize exactly with fp32 scales. `--onnx-scale-dtype fp16` (QDQ only) stores fp16 scales, and then
DequantizeLinear outputs `fp16((q − z)·s)` (one round-to-nearest-even of the exact product, §0), followed
by a Cast to fp32 for the MatMul.

Also registers the runtime loader: an ONNX Runtime session callable like a HF model, for `admmq-export eval`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from admmq_export.errors import UserError
from admmq_export.grids import int_grid
from admmq_export.runtime import register_loader

from . import register
from .base import Converter, QuantOptions, is_decoder_linear
from .onnx_pack import check_mnb_grid

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TWO_GB = 2**31 - 2**20  # protobuf limit with some headroom: above it weights go to external data


class OnnxConverter(Converter):
    name = "onnx"
    output_is_dir = False
    grid_kind = "int"
    types = (None, "matmulnbits")
    scale_dtype = "fp32"  # set from --onnx-scale-dtype by the CLI

    def _form(self, typ: str | None) -> str:
        if typ not in self.types:
            raise UserError(f"unknown ONNX form {typ!r}", "use --to onnx (QDQ DequantizeLinear) or --to onnx:matmulnbits")
        form = "qdq" if typ is None else "matmulnbits"
        if form == "matmulnbits" and self.scale_dtype != "fp32":
            raise UserError("MatMulNBits scales must have the activation dtype (fp32 here), not fp16",
                            "drop --onnx-scale-dtype fp16, or use --to onnx (QDQ) for fp16 scales")
        return form

    def plan(self, typ, q: QuantOptions):
        if self._form(typ) == "matmulnbits":
            check_mnb_grid(0 if q.group_size in (-1, 0) else q.group_size)
        grid = int_grid(self.grid_kind, q.bits, q.group_size, q.sym)

        def plan(name, shape):
            return grid if is_decoder_linear(name) else None

        return plan

    def write(self, ir, tmp_out: Path, typ):
        import onnx

        from admmq_export.fakequant import model_from_ir

        from .onnx_graph import export_fp32, quantize_graph, set_metadata

        form = self._form(typ)
        if ir.arch not in ARCHS:
            raise UserError(f"ONNX export supports {', '.join(ARCHS)}, not {ir.arch}", "use --to gguf or --to gptq")
        model = model_from_ir(ir)
        mp = export_fp32(model)
        weights = {n: p for n, p in model.named_parameters() if n in ir.linears}
        entries = quantize_graph(mp, ir, form, self.scale_dtype, weights)
        set_metadata(mp, {"form": form, "scale_dtype": self.scale_dtype if form == "qdq" else "fp32",
                          "arch": ir.arch, "linears": entries, "meta": ir.meta,
                          "note": "2/3-bit codes are stored in the 4-bit container (container_bits), 5-7-bit in 8-bit"})
        mp.producer_name = "admmq-export"
        size = sum(len(t.raw_data) for t in mp.graph.initializer)
        external = size > TWO_GB
        if external:  # the data file is named after the final output (tmp_out = .<name>.<random>.tmp, paths.atomic_path)
            final = tmp_out.name[1:].rsplit(".", 2)[0] if tmp_out.name.startswith(".") else tmp_out.name
            onnx.save_model(mp, str(tmp_out), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=final + ".data", size_threshold=1024)
        else:
            onnx.save_model(mp, str(tmp_out))
        bits = {e["container_bits"] for e in entries.values()}
        return {"onnx form": form, "quantized MatMuls": len(entries), "container bits": sorted(bits),
                "external data": external, "opset": 21}

    def support(self):
        return [
            {"format": "onnx", "bits": "2,3,4 (int4/uint4), 5-8 (int8/uint8)", "group_size": "-1, any divisor of in-dim",
             "sym": "sym (int, no zp), asym (uint + zp)",
             "dequant": "fp32 (q−z)·s; fp16((q−z)·s) with --onnx-scale-dtype fp16",
             "notes": "opset 21 blocked DequantizeLinear + MatMul; ORT CPU"},
            {"format": "onnx:matmulnbits", "bits": "2,3,4 (4-bit container), 5-8 (8-bit)", "group_size": "-1, multiples of 16",
             "sym": "sym, asym (packed uint8 zp)", "dequant": "fp32 (q−zp)·scale",
             "notes": "com.microsoft.MatMulNBits, blocks 16..256 (a group repeats its scale over blocks)"},
        ]


register(OnnxConverter())


# ---- runtime: ONNX Runtime session as a HF-like callable --------------------------------------------------
class _Out:
    def __init__(self, logits):
        self.logits = logits


class OrtLM:
    """`model(ids[B, T], use_cache=False).logits` through an onnxruntime InferenceSession (CPU).

    ORT fuses DequantizeLinear + MatMul into MatMulNBits with `session.qdq_matmulnbits_accuracy_level`
    defaulting to 4 (activations quantized to int8 per block, logits off by ~0.2 on stories260K); we set it
    to 1 (fp32) so the QDQ file is evaluated in the arithmetic it describes. Pass accuracy_level=4 to
    measure the int8-activation speed path instead.
    """

    def __init__(self, path: str | Path, threads: int | None = None, accuracy_level: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    def eval(self):
        return self

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Past k/v of length 0 ([batch, kv_heads, 0, head_dim] per input)."""
        return [np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past]

    def step(self, input_ids, past=None, attention_mask=None, position_ids=None):
        """One forward with a KV cache: (logits torch [B, T, V], present list of numpy arrays)."""
        ids = torch.as_tensor(input_ids).long()
        past = self.empty_cache(ids.shape[0]) if past is None else past
        n_past = past[0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(ids.shape[0], n_past + ids.shape[1], dtype=torch.long)
        if position_ids is None:
            position_ids = (torch.as_tensor(attention_mask).long().cumsum(-1) - 1).clamp_min(0)[:, n_past:]
        feed = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed = {k: torch.as_tensor(v).long().numpy() for k, v in feed.items() if k in self.inputs}
        feed.update({i.name: p for i, p in zip(self.past, past)})
        out = self.session.run(["logits", *self.present], feed)
        return torch.from_numpy(out[0]), out[1:]

    def __call__(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **_):
        return _Out(self.step(input_ids, None, attention_mask, position_ids)[0])


def is_onnx(path: Path) -> bool:
    return Path(path).suffix == ".onnx" and Path(path).is_file()


def load_onnx(path: Path):
    from admmq_export.fakequant import ir_path_for, is_ir_dir, tokenizer_from_ir
    from admmq_export.ir import QuantizedModel

    ir_dir = ir_path_for(path)
    if not is_ir_dir(ir_dir):
        raise UserError(f"no IR beside {path} (expected {ir_dir}) to take the tokenizer from",
                        "evaluate an .onnx written by admmq-export, next to its .ir folder")
    return OrtLM(path), tokenizer_from_ir(QuantizedModel.load(ir_dir))


register_loader(is_onnx, load_onnx)

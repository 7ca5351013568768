"""ONNX: ONNX Runtime materialises every quantized weight and it must equal the IR's, bit for bit.

- QDQ: a graph holding only the file's DequantizeLinear node and its initializers; ORT's output [K, N]
  (transposed) is compared with `ir.linears[n].dequant()` (fp32), or with its fp16 rounding when the file
  stores fp16 scales (DQ output dtype = scale dtype, formats.md §0, §3.1).
- MatMulNBits: the file's node with A = the K×K identity, so Y = I·Wᵀ = Wᵀ (each output is 1·w plus exact
  zeros), compared the same way.
- `onnx.checker.check_model(full_check=True)` on the file (a row `<model>` / onnx.checker).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import compare, register

CHECKER = "onnxruntime"


def detect(path: Path) -> bool:
    return Path(path).suffix == ".onnx" and Path(path).is_file()


def _run_node(node, inits: dict, opsets, out_type: int, extra_inputs: dict | None = None) -> np.ndarray:
    """Run one node of the file in a graph of its own: its initializers as constants, extra inputs fed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    extra_inputs = extra_inputs or {}
    g_inputs = [helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for k, v in extra_inputs.items()]
    out = helper.make_tensor_value_info(node.output[0], out_type, None)
    tensors = [inits[i] for i in node.input if i in inits]
    g = helper.make_graph([node], "materialise", g_inputs, [out], initializer=tensors)
    m = helper.make_model(g, opset_imports=list(opsets))
    m.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the kernel itself, no fusion
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, extra_inputs)[0]


def check(path: Path, ir) -> list[dict]:
    import onnx

    from converters.onnx_graph import get_metadata

    rows = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
        rows.append({"tensor": "<model>", "checker": "onnx.checker", "status": "exact", "exact": True, "n_diff": 0,
                     "max_ulp": 0, "reason": ""})
    except Exception as e:  # noqa: BLE001 - any checker failure is a failed row
        rows.append({"tensor": "<model>", "checker": "onnx.checker", "status": "differs", "exact": False, "n_diff": -1,
                     "max_ulp": None, "reason": f"{type(e).__name__}: {str(e)[:200]}"})
    mp = onnx.load(str(path), load_external_data=True)
    doc = get_metadata(mp)
    entries = doc.get("linears", {})
    nodes = {n.name: n for n in mp.graph.node}
    inits = {t.name: t for t in mp.graph.initializer}
    for name in sorted(ir.linears):
        want = ir.linears[name].dequant()
        e = entries.get(name)
        node = nodes.get((e or {}).get("dq_node") or (e or {}).get("mnb_node"))
        if node is None:
            rows.append({"tensor": name, "checker": CHECKER, "status": "differs", "exact": False, "n_diff": -1,
                         "max_ulp": None, "reason": "no quantized node for this linear in the file"})
            continue
        if node.op_type == "DequantizeLinear":
            got = _run_node(node, inits, mp.opset_import, inits[node.input[1]].data_type)  # DQ output = scale dtype
            if got.dtype == np.float16:
                want = want.half()
            checker = f"{CHECKER} DQ"
        else:
            k = next(a.i for a in node.attribute if a.name == "K")
            ident = np.eye(k, dtype=np.float32)
            node = onnx.helper.make_node(node.op_type, ["A", *node.input[1:]], list(node.output), domain=node.domain,
                                         name=node.name)
            node.attribute.extend(nodes[e["mnb_node"]].attribute)
            got = _run_node(node, inits, mp.opset_import, onnx.TensorProto.FLOAT, {"A": ident})
            checker = f"{CHECKER} MatMulNBits"
        rows.append(compare(name, checker, torch.from_numpy(np.ascontiguousarray(got.T)), want))
    return rows


register(detect, check)

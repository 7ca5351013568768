"""Build the ONNX graph of the whole decoder LM and swap each quantized linear's weight for its packed form.

1. `export_fp32`: the fake-quant torch model (`fakequant.model_from_ir`, fp32, eager attention, with a KV
   cache, see LMWithCache) traced by torch's TorchScript ONNX exporter at opset 20 (its newest; the
   dynamo exporter needs onnxscript, not a dependency), then moved to opset 21 by `to_opset_21` (opset 21
   only widened types of Cast, Reshape, Transpose, ... and added int4 to Q/DQ; blocked DequantizeLinear
   needs opset 21 and IR version 10, formats.md §3.1). Inputs `input_ids`,
   `position_ids` (int64 [batch, seq]), `attention_mask` (int64 [batch, past + seq]), `past_key_values.{i}.key|value`
   (fp32 [batch, kv_heads, past, head_dim], past may be 0); outputs `logits` (fp32 [batch, seq, vocab]) and
   `present.{i}.key|value` (fp32 [batch, kv_heads, past + seq, head_dim]).
   The exporter stores each `nn.Linear` as `MatMul(x, B)` with B = Wᵀ [in, out] constant-folded.
2. `quantize_graph`: finds every quantized linear's B by value (it must equal `ir.linears[n].dequant()ᵀ`
   bit for bit, which also proves the trace used our weights) and replaces it with
   `DequantizeLinear(x, scale[, zp])` (QDQ) or replaces the MatMul with `com.microsoft.MatMulNBits`.
   A JSON map of HF name -> node names and grids is stored in `metadata_props["admmq_export"]`.
   With tied embeddings, lm_head's MatMul reads `Transpose(embedding)` instead of the exporter's second,
   transposed copy (SmolLM2-135M: 288 MB -> 183 MB).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from admmq_export.errors import UserError

from .onnx_pack import container_bits, pack_matmulnbits, pack_qdq

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
META_KEY = "admmq_export"
INPUTS = ("input_ids", "attention_mask", "position_ids")


class LMWithCache(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past k/v per layer) -> (logits, present k/v per layer).

    One graph serves both uses: prefill / no-cache evaluation feeds empty pasts (past_sequence = 0), decoding
    feeds the previous presents. `attention_mask` covers past + current tokens. Every layer keeps its full
    cache (transformers' DynamicLayer); sliding-window layers apply their window through the mask.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """onnxruntime-genai / optimum names: past_key_values.{i}.key|value in, present.{i}.key|value out."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, [n.replace("past_key_values", "present") for n in past]


def export_fp32(model) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    cfg = model.config
    cfg._attn_implementation = "eager"  # plain MatMul/Softmax attention, no SDPA fast paths in the trace
    wrapper = LMWithCache(model).eval()
    P, T = 3, 2  # traced with a non-empty past so the cache concatenation is in the graph
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past = [torch.zeros(1, cfg.num_key_value_heads, P, head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    ids = torch.arange(T).unsqueeze(0) % cfg.vocab_size
    past_names, present_names = cache_names(cfg.num_hidden_layers)
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dims.update({n: {0: "batch", 2: "past_sequence"} for n in past_names})
    dims.update({n: {0: "batch", 2: "total_sequence"} for n in present_names})
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d) / "fp32.onnx"
        with torch.no_grad():
            torch.onnx.export(wrapper, (ids, torch.ones(1, P + T, dtype=torch.long), torch.arange(P, P + T).unsqueeze(0), *past),
                              str(path), input_names=[*INPUTS, *past_names], output_names=["logits", *present_names],
                              dynamic_axes=dims, opset_version=20, do_constant_folding=True, dynamo=False)
        mp = onnx.load(str(path), load_external_data=True)
    to_opset_21(mp)
    return mp


# Ops whose opset-21 version only widened the accepted types (int4/uint4, float8), per onnx's Changelog; the
# exported graph means the same at opset 21. GroupNormalization-21 changed semantics and is not listed.
TYPE_ONLY_21 = {"Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
                "Loop", "Pad", "QLinearMatMul", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze",
                "Transpose", "Unsqueeze"}


def to_opset_21(mp) -> None:
    """Opset 20 -> 21 in place, refusing any op whose schema changed beyond types (what version_converter's
    compatible adapters do, without serialising the model, which fails above protobuf's 2 GB)."""
    from onnx import defs

    changed = {n.op_type for n in mp.graph.node if n.domain in ("", "ai.onnx")
               and defs.get_schema(n.op_type, OPSET).since_version > 20 and n.op_type not in TYPE_ONLY_21}
    if changed:
        raise UserError(f"the exported graph uses {sorted(changed)}, changed in opset 21", "use --to gguf or --to gptq")
    for o in mp.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = OPSET
    mp.ir_version = IR_VERSION


def _key(arr: np.ndarray) -> str:
    return hashlib.sha256(str(arr.shape).encode() + np.ascontiguousarray(arr).tobytes()).hexdigest()


def _find_weights(mp, ir, weights: dict | None = None) -> dict[str, "onnx.NodeProto"]:  # noqa: F821
    """HF linear name -> the MatMul whose B initializer holds exactly that linear's dequantized Wᵀ.

    `weights` (name -> fp32 weight, e.g. the traced model's) saves recomputing `dequant()`; they are the same values.
    """
    from onnx import numpy_helper

    want: dict[str, list[str]] = {}
    for name in sorted(ir.linears):
        w = weights[name] if weights is not None else ir.linears[name].dequant()
        want.setdefault(_key(w.detach().float().T.contiguous().numpy()), []).append(name)
    inits = {t.name: t for t in mp.graph.initializer}
    found = {}
    for node in mp.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if t.data_type != 1 or len(t.dims) != 2:
            continue
        names = want.get(_key(numpy_helper.to_array(t)))
        if names:
            found[names.pop(0)] = node
    missing = sorted(set(ir.linears) - set(found))
    if missing:
        raise UserError(f"the traced ONNX graph has no MatMul holding {missing[0]} (and {len(missing) - 1} more)",
                        "this architecture's linears are not plain MatMuls after export; use --to gguf or --to gptq")
    return found


def _initializer(name: str, arr: np.ndarray, elem, dims):
    from onnx import helper, numpy_helper

    if elem is None:
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)
    return helper.make_tensor(name, elem, list(dims), vals=np.ascontiguousarray(arr).tobytes(), raw=True)


def quantize_graph(mp, ir, form: str, scale_dtype: str = "fp32", weights: dict | None = None) -> dict:
    """Rewrite `mp` in place; return the per-linear map stored in the metadata."""
    from onnx import TensorProto, helper

    found = _find_weights(mp, ir, weights)
    g = mp.graph
    new_nodes, new_inits, entries = [], [], {}
    replace: dict[int, object] = {}
    for hf, node in sorted(found.items()):
        ql = ir.linears[hf]
        entry = {"bits": ql.grid.bits, "container_bits": container_bits(ql.grid.bits), "group_size": ql.grid.group_size,
                 "sym": ql.grid.sym, "grid": ql.grid.name}
        if form == "qdq":
            p = pack_qdq(hf, ql, scale_dtype)
            names = [f"{hf}.{k}" for k in p.tensors]
            new_inits += [_initializer(n, *p.tensors[k]) for n, k in zip(names, p.tensors)]
            dq_out = f"{hf}.dequantized"
            dq = helper.make_node("DequantizeLinear", names, [dq_out], name=f"{hf}/DequantizeLinear", **p.attrs)
            new_nodes.append(dq)
            entry.update(dq_node=dq.name, scale_dtype=scale_dtype)
            if scale_dtype == "fp16":  # DQ output dtype = scale dtype (§3.1); MatMul with fp32 activations
                cast = helper.make_node("Cast", [dq_out], [dq_out + "_fp32"], name=f"{hf}/Cast", to=TensorProto.FLOAT)
                new_nodes.append(cast)
                dq_out = cast.output[0]
            node.input[1] = dq_out
            entry["matmul_node"] = node.name
        else:
            p = pack_matmulnbits(hf, ql)
            names = [f"{hf}.{k}" for k in p.tensors]
            new_inits += [_initializer(n, *p.tensors[k]) for n, k in zip(names, p.tensors)]
            inputs = [node.input[0], names[0], names[1]] + ([names[2]] if "zero_points" in p.tensors else [])
            mnb = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{hf}/MatMulNBits",
                                   domain=MS_DOMAIN, **p.attrs)
            replace[id(node)] = mnb
            entry.update(mnb_node=mnb.name, block_size=p.attrs["block_size"])
        entries[hf] = entry
    new_nodes += _share_tied_embedding(mp, ir)
    nodes = new_nodes + [replace.get(id(n), n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if form == "matmulnbits" and not any(o.domain == MS_DOMAIN for o in mp.opset_import):
        mp.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return entries


def _share_tied_embedding(mp, ir) -> list:
    """Tied embeddings: the exporter stores lm_head's B as a second, transposed copy of the embedding matrix.
    Point that MatMul at `Transpose(embedding)` instead (ORT folds it at load), so the file holds it once."""
    from onnx import helper, numpy_helper

    emb = ir.tensors.get("model.embed_tokens.weight")
    if not ir.config.get("tie_word_embeddings") or emb is None:
        return []
    emb = emb.float().numpy()
    inits = {t.name: t for t in mp.graph.initializer if t.data_type == 1 and len(t.dims) == 2}
    src = [n for n, t in inits.items() if tuple(t.dims) == emb.shape and _key(numpy_helper.to_array(t)) == _key(emb)]
    copies = {n for n, t in inits.items() if tuple(t.dims) == emb.shape[::-1]
              and _key(numpy_helper.to_array(t)) == _key(np.ascontiguousarray(emb.T))}
    if not src or not copies:
        return []
    out = "lm_head.weight.transposed"
    for node in mp.graph.node:
        if node.op_type == "MatMul" and node.input[1] in copies:
            node.input[1] = out
    return [helper.make_node("Transpose", [src[0]], [out], name="lm_head/TiedTranspose", perm=[1, 0])]


def set_metadata(mp, doc: dict) -> None:
    from onnx import helper

    helper.set_model_props(mp, {META_KEY: json.dumps(doc, sort_keys=True, default=str)})


def get_metadata(mp) -> dict:
    for p in mp.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return {}

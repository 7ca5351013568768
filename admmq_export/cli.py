"""admmq-export command line.

  admmq-export MODEL --to FORMAT[:TYPE] -o OUT [options]   quantize and export
  admmq-export eval MODEL_OR_OUTPUT --data FILE [...]     perplexity / KLD
  admmq-export check OUTPUT [--json]                      bit-exact check of a written file against its IR
  admmq-export formats                                    the support matrix
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError
from .paths import shared

SUBCOMMANDS = ("eval", "check", "formats")
DEFAULT_CALIB = "data/c4-train-00000-first1000.jsonl"


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="admmq-export",
        description="Quantize an LLM with ADMM-Q/GPTQ/RTN on the grid of the target format and export it bit-exactly.",
        epilog="Other commands: `admmq-export eval MODEL_OR_OUTPUT --data FILE`, `admmq-export check OUTPUT`, "
        "`admmq-export formats`. MODEL is a .gguf file, a Hugging Face folder, or one of the offline "
        "models: smollm2, gemma3-270m, stories260k.",
    )
    p.add_argument("model", help="a .gguf file, a HF model folder, or smollm2 | gemma3-270m | stories260k")
    p.add_argument("--to", required=True, help="output format[:type]: ir, gguf:q4_k_m, gptq, marlin, onnx, onnx:matmulnbits (see `formats`)")
    p.add_argument("-o", "--output", required=True, help="output path (file or folder, by format)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "admmq"], help="quantizer (default rtn)")
    p.add_argument("--bits", type=int, default=4, help="bits for integer grids (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="group size, -1 per channel (default 128)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    g.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (integer zero points)")
    p.add_argument("--calib", default=None, help=f"calibration text: .txt, .jsonl or .parquet (default ../shared/{DEFAULT_CALIB})")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--device", default="cpu", help="compute device for the current layer: cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--no-calib-bos", dest="calib_bos", action="store_false",
                   help="calibration windows as cut from the text (default: BOS first, as llama.cpp runs the model, "
                        "when the tokenizer adds BOS)")
    p.add_argument("--fallback", default="error", choices=["error", "per-channel", "keep"],
                   help="tensors whose in-dim the group does not divide: error (default), per-channel grid, or keep in float; always reported")
    p.add_argument("--resume", action="store_true", help="continue from the last finished layer of an interrupted run")
    p.add_argument("--clip-search", action="store_true", help="diag(H)-weighted clipping search for group parameters (see --clip-mode)")
    p.add_argument("--clip-mode", default="shrink", choices=["shrink", "refit"],
                   help="with --clip-search: shrink (default; ranges x1 ... x0.8) or refit (ranges x0.8 ... x1.1, each with the "
                        "weighted least-squares scales/offsets for its own codes, as llama.cpp's scale search; K-quants "
                        "also per sub-block, with a super-scale search; re-finds blocks llama.cpp wrote)")
    p.add_argument("--act-order", action="store_true", help="GPTQ/ADMM-Q: quantize columns by decreasing diag(H)")
    p.add_argument("--static-groups", action="store_true", help="with --act-order: fix group parameters up front")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diag (default 0.01)")
    p.add_argument("--admm-iters", type=int, default=None, help="ADMM-Q iterations (default: spec)")
    p.add_argument("--no-local-search", action="store_true", help="ADMM-Q: skip the local-search polish")
    p.add_argument("--rho0", type=float, default=0.1, help="ADMM-Q: initial penalty in the unit-diagonal scaling (default 0.1)")
    p.add_argument("--admm-solver", default="cholesky", choices=["cholesky", "eigh"],
                   help="ADMM-Q W-step: a Cholesky of H+rho*I per penalty value (default) or one fp64 eigendecomposition (ALPS form)")
    p.add_argument("--admm-init", default="rtn", choices=["rtn", "gptq"], help="ADMM-Q: initial codes (default rtn)")
    p.add_argument("--refit", action="store_true",
                   help="ADMM-Q: refit group scales/zeros (K-quants: sub-scales/mins and their fp16 super-scale) for the final codes by H-weighted least squares; kept per tensor only where the objective drops")
    p.add_argument("--refit-rounds", type=int, default=1,
                   help="ADMM-Q with --refit: alternate refit and ADMM this many rounds (ADMM re-run on each refitted grid from the current codes); stops at the first round that does not lower the objective (default 1: one refit)")
    p.add_argument("--asym-calib", action="store_true",
                   help="asymmetric calibration (GPTAQ-style): fit each linear to the original model's output from the quantized model's input (a second, full-precision forward stream)")
    p.add_argument("--safety-net", action="store_true",
                   help="ADMM-Q: also run GPTQ + local search and keep the lower layer objective")
    p.add_argument("--tune-steps", type=int, default=0,
                   help="after quantizing: tune the grids' float fields (fp16 scales/mins; codes and integer fields fixed) and the norm weights end-to-end for N steps on the calibration windows, on --tune-loss; kept only if that loss on held-out calibration windows drops (default 0: off)")
    p.add_argument("--tune-lr", type=float, default=1e-4, help="with --tune-steps: Adam learning rate (default 1e-4)")
    p.add_argument("--tune-loss", default="kl", help="with --tune-steps: what is tuned and guarded: kl (to the original model; default) or ce (next-token cross-entropy of the calibration text, which may move the model past the original)")
    p.add_argument("--onnx-scale-dtype", default="fp32", choices=["fp32", "fp16"],
                   help="--to onnx: DequantizeLinear scale dtype; fp32 (default) is exact, fp16 makes the weight fp16((q-z)*s)")
    p.add_argument("--json-report", default=None, help="write per-layer statistics as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _method_options(a) -> dict:
    opts: dict = {}
    if a.clip_mode != "shrink" and not a.clip_search:
        raise UserError(f"--clip-mode {a.clip_mode} needs --clip-search", "add --clip-search")
    if a.clip_search:
        opts["clip_search"] = True if a.clip_mode == "shrink" else a.clip_mode
    if a.method in ("gptq", "admmq"):
        opts.update(damp=a.damp, act_order=a.act_order, static_groups=a.static_groups)
    if a.method == "admmq":
        if a.act_order:
            raise UserError("ADMM-Q fixes the grid before optimising and has no column order (admmq.md §6)",
                            "drop --act-order (it applies to --method gptq)")
        opts.pop("act_order")
        if a.refit_rounds < 1 or (a.refit_rounds > 1 and not a.refit):
            raise UserError(f"--refit-rounds {a.refit_rounds} needs --refit and a count of at least 1",
                            "add --refit, or drop --refit-rounds")
        opts.update(rho0=a.rho0, iters=300 if a.admm_iters is None else a.admm_iters, init=a.admm_init,
                    local_search=not a.no_local_search, safety_net=a.safety_net, refit=a.refit,
                    refit_rounds=a.refit_rounds, schedule="alps", precondition=True, solver=a.admm_solver)
    return opts


def _check_finite(model) -> None:
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"weight {name} contains NaN or Inf values", "repair or re-download the model; it cannot be quantized")


def _tune_summary(t: dict) -> str:
    verdict = "kept" if t["kept"] else "discarded (no held-out gain)"
    return (f"{t['steps']} steps ({t['loss']}) on {t['tensors']} tensors + {t['norms']} norms, held-out KL "
            f"{t['heldout_kl_before']:.4g} -> {t['heldout_kl_after']:.4g}, CE {t['heldout_ce_before']:.4g} -> "
            f"{t['heldout_ce_after']:.4g}: {verdict}, {t['seconds']:.0f}s")


def cmd_export(argv) -> int:
    import torch

    from converters import get_converter
    from converters.base import QuantOptions

    from . import __version__
    from .calib import bos_id, calibration_samples
    from .fakequant import ir_path_for
    from .models import load_model
    from .paths import atomic_path, check_writable
    from .pipeline import PipelineOptions, quantize_model
    from .tune import check_options as check_tune_options
    from .tune import tune_ir

    a = _export_parser().parse_args(argv)
    out = Path(a.output)
    check_writable(out)
    conv, typ = get_converter(a.to)
    if hasattr(conv, "scale_dtype"):
        conv.scale_dtype = a.onnx_scale_dtype
    elif a.onnx_scale_dtype != "fp32":
        raise UserError(f"--onnx-scale-dtype applies to --to onnx, not --to {a.to}", "drop --onnx-scale-dtype")
    plan = conv.planned(typ, QuantOptions(a.bits, a.group_size, a.sym), a.fallback)
    check_tune_options(a.tune_steps, a.tune_lr, a.nsamples, a.tune_loss)
    t0 = time.time()
    lm = load_model(a.model)
    _check_finite(lm.model)
    plan = conv.planned(typ, QuantOptions(a.bits, a.group_size, a.sym), a.fallback, config=lm.model.config.to_dict())
    shapes = [(f"{n}.weight", tuple(m.weight.shape)) for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    shapes.append(("model.embed_tokens.weight", tuple(lm.model.get_input_embeddings().weight.shape)))
    for name, shape in shapes:
        grid = plan(name, shape)
        if grid is not None:
            grid.check_shape(*shape, name=name)
    calib = a.calib or str(shared(DEFAULT_CALIB))
    samples = calibration_samples(lm.tokenizer, calib, a.nsamples, a.seqlen, a.seed, a.calib_bos)
    meta = {"source": Path(lm.source).name, "method": a.method, "method_options": _method_options(a), "to": a.to,
            "calibration": {"file": Path(calib).name, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                            "bos": bool(a.calib_bos and bos_id(lm.tokenizer) is not None), "asymmetric": a.asym_calib},
            "admmq_export_version": __version__}
    state = out.with_name(out.name + ".admmq-state")
    if not a.resume and state.exists():
        import shutil

        shutil.rmtree(state)
    opts = PipelineOptions(a.method, _method_options(a), a.device, state, a.resume, not a.quiet, a.asym_calib)
    ir, stats = quantize_model(lm.model, samples, plan, opts, meta)
    ir.gguf_tokenizer = lm.gguf_tokenizer
    report = {f"fallback {k}": v for k, v in plan.fallbacks.items()}
    if a.tune_steps:
        ir.meta["tune"] = tune_ir(ir, load_model(a.model).model, samples, a.tune_steps, a.tune_lr, not a.quiet,
                                  a.tune_loss)
        report["tune"] = _tune_summary(ir.meta["tune"])
    import tempfile

    with tempfile.TemporaryDirectory() as tdir:
        lm.tokenizer.save_pretrained(tdir)
        ir.tokenizer_dir = Path(tdir)
        ir_out = ir_path_for(out) if conv.name != "ir" else out
        ir.save(ir_out)
        ir.tokenizer_dir = ir_out / "tokenizer"
    if conv.name != "ir":
        with atomic_path(out, directory=conv.output_is_dir) as tmp:
            report.update(conv.write(ir, tmp, typ) or {})
    opts_state = opts.state_dir
    if opts_state is not None and opts_state.exists():
        import shutil

        shutil.rmtree(opts_state)
    import resource

    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["seconds"] = round(time.time() - t0, 2)
    if a.json_report:
        doc = {"stats": stats, "report": report, "calibration": meta["calibration"]}
        Path(a.json_report).write_text(json.dumps(doc, indent=1, default=str))
    n = len(stats)
    obj = sum(s["objective"] for s in stats.values() if s["objective"] == s["objective"])
    print(f"quantized {n} tensors with {a.method} in {time.time() - t0:.1f}s; sum of layer objectives {obj:.4g}")
    print(f"wrote {out}" + (f" and its IR {ir_path_for(out)}" if conv.name != "ir" else ""))
    for k, v in report.items():
        print(f"  {k}: {v}")
    return 0


def cmd_eval(argv) -> int:
    p = argparse.ArgumentParser(prog="admmq-export eval", description="Perplexity (and KLD) of a model, IR or written file.")
    p.add_argument("model", help="model, IR folder or written output (.gguf, GPTQ folder, .onnx)")
    p.add_argument("--data", default=str(shared("data", "wikitext2-test.txt")), help="evaluation text (default WikiText-2 test)")
    p.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"])
    p.add_argument("--seqlen", type=int, default=None, help="window length (gptq default 2048, llamacpp 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--reference", default=None, help="model to measure KL divergence against")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from .evaluate import eval_windows, perplexity
    from .runtime import load_for_eval

    model, tok = load_for_eval(a.model)
    ref = load_for_eval(a.reference)[0] if a.reference else None
    win = eval_windows(tok, a.data, a.protocol, a.seqlen, a.max_windows)
    res = perplexity(model, win, ref, progress=not a.json)
    res["protocol"] = a.protocol
    if a.json:
        print(json.dumps(res))
    else:
        print(f"ppl {res['ppl']:.4f} over {res['tokens']} tokens ({res['windows']} windows, {a.protocol})"
              + (f"; KLD {res['kld']:.6f}" if "kld" in res else ""))
    return 0


def cmd_check(argv) -> int:
    p = argparse.ArgumentParser(prog="admmq-export check", description="Compare every tensor of a written file with its IR, bit for bit, through third-party readers.")
    p.add_argument("output")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kernels", action="store_true", help="GPTQ/Marlin: which kernels can run each layer, and why not")
    p.add_argument("--tp", type=int, default=1, help="with --kernels: tensor-parallel degree (default 1)")
    p.add_argument("--gpu", action="store_true", help="every quantized tensor through the real GPU kernels that can hold it "
                   "(Marlin, torch int4/int8, TritonV2, ggml-cuda) and their CPU twins; see kernels_check/gpu.py")
    a = p.parse_args(argv)
    if a.gpu:
        from kernels_check.gpu import cmd_gpu

        return cmd_gpu(a.output, a.json)
    from kernels_check import check_output, format_table

    if a.kernels:
        return _kernel_preflight(a)

    rows = check_output(a.output)
    ok = all(r["exact"] for r in rows if r["status"] not in ("not representable", "unavailable"))
    if a.json:
        print(json.dumps({"ok": ok, "tensors": rows}, indent=1))
    else:
        print(format_table(rows))
        print("all tensors exact" if ok else "MISMATCH: some tensors differ")
    return 0 if ok else 1


def _kernel_preflight(a) -> int:
    from converters.gptq_kernels import format_preflight, preflight, summary

    from .fakequant import ir_path_for, is_ir_dir
    from .ir import QuantizedModel

    ir_dir = a.output if is_ir_dir(a.output) else ir_path_for(Path(a.output))
    if not is_ir_dir(ir_dir):
        raise UserError(f"no IR found for {a.output}", "pass an output written by admmq-export (its .ir folder sits beside it)")
    ir = QuantizedModel.load(ir_dir)
    rows = [preflight(n, q.shape, q.grid.bits, q.grid.group_size, q.grid.sym, q.g_idx is not None, a.tp)
            for n, q in sorted(ir.linears.items()) if q.grid.family == "int"]
    if not rows:
        raise UserError(f"{a.output} has no integer-grid (GPTQ-style) layers", "--kernels applies to --to gptq/marlin outputs")
    print(json.dumps(rows, indent=1) if a.json else format_preflight(rows) + "\n" + summary(rows))
    return 0 if all(r["kernels"] for r in rows) else 1


def cmd_formats(argv) -> int:
    argparse.ArgumentParser(prog="admmq-export formats", description="Print the support matrix.").parse_args(argv)
    from .support import support_table

    print(support_table())
    return 0


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors only: silence transformers' bars and warnings."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return {"eval": cmd_eval, "check": cmd_check, "formats": cmd_formats}[argv[0]](argv[1:])
        return cmd_export(argv)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted. Fix: re-run with --resume to continue from the last finished layer", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

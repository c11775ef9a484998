"""``mhc-fx``: the command line.

    mhc-fx demo [--steps 150] [--n 4] [--layers 12] [--device cpu] [--out mhc_demo]
    mhc-fx inspect SPEC                     # what would be converted, as tables
    mhc-fx convert SPEC --out DIR           # converted model, loaded back by mhc_fx.from_pretrained(DIR)
    mhc-fx export SPEC --out FILE.onnx      # converted model → ONNX, checked in ONNX Runtime
    mhc-fx export SPEC --genai --out DIR    # a causal LM → ONNX Runtime GenAI folder (KV cache), checked there

SPEC is ``timm:NAME``, ``hf:MODEL_TYPE`` (random weights from a small config), ``hf:PATH`` (a
local directory with config and weights; a save of a converted model loads converted) or
``module.path:factory``. Code that a saved folder names runs only with ``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from rich.console import Console

from .config import METHODS, MHCConfig
from .convert import convert, find_residuals, is_converted, report as conversion_report
from .errors import MHCError
from .pretrained import load_spec, save
from .specs import SpecError


def _shape(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(d) for d in text.split(",")) if text else None


def _config(args) -> MHCConfig:
    return MHCConfig(n=args.n, method=args.method)


def _load(args):
    return load_spec(args.spec, _shape(args.input_shape), trust_remote_code=args.trust_remote_code)


def _converted(args, model, ex_args, ex_kwargs):
    """``model`` converted with the command's config, or as it is when it was loaded converted."""
    return model if is_converted(model) else convert(model, ex_args, ex_kwargs, config=_config(args))


def _inspect(args, console: Console) -> None:
    model, ex_args, ex_kwargs = _load(args)
    if is_converted(model):
        console.print(conversion_report(model))
        return
    console.print(find_residuals(model, ex_args, ex_kwargs, config=_config(args)))


def _convert(args, console: Console) -> None:
    converted = _converted(args, *_load(args))
    console.print(conversion_report(converted))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(converted, "save_pretrained"):  # Hugging Face: its own format, with the mhc_fx entry in config.json
        converted.save_pretrained(out)
    else:
        save(converted, out, args.spec)
    console.print(f"wrote {out}; load it with mhc_fx.from_pretrained({str(out)!r})")


def _export(args, console: Console) -> None:
    from .export.onnx import export_onnx

    model, ex_args, ex_kwargs = _load(args)
    converted = _converted(args, model, ex_args, ex_kwargs)
    if args.genai:
        _export_genai(args, converted, console)
        return
    report = export_onnx(converted, ex_args, args.out or "model.onnx", example_kwargs=ex_kwargs, functions=args.functions, verify=not args.no_verify)
    console.print(f"wrote {report.path}: opset {report.opset}, {report.nodes} nodes, inputs {report.inputs}")
    if report.functions:
        console.print(f"mhc_fx local functions (calls): {report.functions}")
    for check in report.checks:
        console.print(
            f"ONNX Runtime ({report.provider}) vs PyTorch on {check.shapes}: max abs {check.max_abs:.2e}, relative {check.max_rel:.2e}"
        )


def _export_genai(args, model, console: Console) -> None:
    from .export.genai import export_genai
    from .export.onnx import ExportError

    if args.functions or args.out is None:
        raise ExportError("--genai writes a folder: give it with --out DIR (and --functions does not apply to it)")
    tokenizer = None
    if args.spec.startswith("hf:") and (pathlib.Path(args.spec[3:]) / "tokenizer.json").exists():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.spec[3:])
    report = export_genai(model, args.out, tokenizer, verify=not args.no_verify)
    console.print(
        f"wrote {report.folder}: model.onnx ({report.nodes} nodes, {report.layers} layers of KV cache), "
        f"genai_config.json (type {report.model_type})" + (", tokenizer" if tokenizer is not None else "")
    )
    for prompt, tokens in report.checked:
        console.print(f"ONNX Runtime GenAI = PyTorch generate() from {prompt}: {tokens}")


def _demo(args, console: Console) -> None:
    from .demo.run import DemoSettings, run_demo

    run_demo(
        DemoSettings(steps=args.steps, n=args.n, layers=args.layers, device=args.device, out=pathlib.Path(args.out),
                     onnx=not args.no_onnx),
        console,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mhc-fx", description="Convert residual connections to mHC/HC; inspect, export, demo.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,inspect,convert,export}")
    spec = argparse.ArgumentParser(add_help=False)
    spec.add_argument("spec", help="timm:NAME | hf:MODEL_TYPE | hf:PATH | module.path:factory")
    spec.add_argument("--input-shape", help="example input shape, comma separated (default: from the spec)")
    spec.add_argument("--method", default="mhc", choices=METHODS)
    spec.add_argument("--n", type=int, default=4)
    spec.add_argument("--trust-remote-code", action="store_true",
                      help="let a saved folder run the code it names (a module.path:factory spec, transformers' remote code)")
    sub.add_parser("inspect", parents=[spec], help="print the conversion report as tables").set_defaults(run=_inspect)
    c = sub.add_parser("convert", parents=[spec], help="save the converted model (load it with mhc_fx.from_pretrained)")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(run=_convert)
    e = sub.add_parser("export", parents=[spec], help="convert, export to ONNX, check in ONNX Runtime")
    e.add_argument("--out", help="the ONNX file (default: model.onnx), or with --genai the folder")
    e.add_argument("--genai", action="store_true",
                   help="a causal LM with its KV cache as an ONNX Runtime GenAI folder, checked by generating there")
    e.add_argument("--functions", action="store_true", help="fold connections into mhc_fx ONNX functions (not with --genai)")
    e.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    e.set_defaults(run=_export)
    d = sub.add_parser("demo", help="residual vs HC vs mHC on a deep GPT: table, plots, ONNX")
    d.add_argument("--steps", type=int, default=150)
    d.add_argument("--n", type=int, default=4)
    d.add_argument("--layers", type=int, default=12)
    d.add_argument("--device", default="cpu")
    d.add_argument("--out", default="mhc_demo", help="directory for plots and the ONNX file (default: %(default)s)")
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    d.set_defaults(run=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    torch.manual_seed(0)
    try:
        args.run(args, console)
    except (MHCError, SpecError) as err:
        console.print(f"mhc-fx: {err}", soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

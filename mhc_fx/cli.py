"""``mhc-fx``: the command line.

    mhc-fx demo [--steps 150] [--n 4] [--layers 12] [--device cpu] [--out mhc_demo]
    mhc-fx inspect SPEC                     # what would be converted, as tables
    mhc-fx convert SPEC --out DIR           # converted model, loaded back by mhc_fx.from_pretrained(DIR)
    mhc-fx export SPEC --out FILE.onnx      # converted model → ONNX, checked in ONNX Runtime

SPEC is ``timm:NAME``, ``hf:MODEL_TYPE`` (random weights from a small config), ``hf:PATH`` (a
local directory with config and weights) or ``module.path:factory``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from rich.console import Console

from .config import METHODS, MHCConfig
from .convert import convert, find_residuals, report as conversion_report
from .errors import MHCError
from .pretrained import save
from .specs import SpecError, load


def _shape(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(d) for d in text.split(",")) if text else None


def _config(args) -> MHCConfig:
    return MHCConfig(n=args.n, method=args.method)


def _inspect(args, console: Console) -> None:
    model, ex_args, ex_kwargs = load(args.spec, _shape(args.input_shape))
    console.print(find_residuals(model, ex_args, ex_kwargs, config=_config(args)))


def _convert(args, console: Console) -> None:
    model, ex_args, ex_kwargs = load(args.spec, _shape(args.input_shape))
    config = _config(args)
    converted = convert(model, ex_args, ex_kwargs, config=config)
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

    model, ex_args, ex_kwargs = load(args.spec, _shape(args.input_shape))
    converted = convert(model, ex_args, ex_kwargs, config=_config(args))
    report = export_onnx(converted, ex_args, args.out, example_kwargs=ex_kwargs, functions=args.functions, verify=not args.no_verify)
    console.print(f"wrote {report.path}: opset {report.opset}, {report.nodes} nodes, inputs {report.inputs}")
    if report.functions:
        console.print(f"mhc_fx local functions (calls): {report.functions}")
    for check in report.checks:
        console.print(
            f"ONNX Runtime ({report.provider}) vs PyTorch on {check.shapes}: max abs {check.max_abs:.2e}, relative {check.max_rel:.2e}"
        )


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
    sub.add_parser("inspect", parents=[spec], help="print the conversion report as tables").set_defaults(run=_inspect)
    c = sub.add_parser("convert", parents=[spec], help="save the converted model (load it with mhc_fx.from_pretrained)")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(run=_convert)
    e = sub.add_parser("export", parents=[spec], help="convert, export to ONNX, check in ONNX Runtime")
    e.add_argument("--out", default="model.onnx", help="the ONNX file (default: %(default)s)")
    e.add_argument("--functions", action="store_true", help="fold connections into mhc_fx ONNX functions")
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

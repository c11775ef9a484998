"""``mhc-fx``: convert a model and show what was converted; export it to ONNX.

    mhc-fx                                   # the embedded default: a small GPT, mHC n=4
    mhc-fx --model mypkg.models:build --input-shape 2,3,224,224 --method hc --n 2
    mhc-fx export --out gpt_mhc.onnx [--functions]

With no arguments it builds :class:`mhc_fx.zoo.TinyGPT`, converts it, prints the conversion
report and checks that the converted model computes the original function on fresh inputs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
from rich.console import Console

from .config import METHODS, MHCConfig
from .conversion import convert
from .errors import MHCError
from .onnx import export_onnx

DEFAULT_MODEL = "mhc_fx.zoo:TinyGPT"


def _load(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise SystemExit(f"mhc-fx: --model must be 'module.path:factory', got {spec!r}")
    if os.getcwd() not in sys.path:  # like `python -m`: modules of the working directory load
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"mhc-fx: cannot load {spec!r}: {err}") from err


def _example(model: torch.nn.Module, shape: str | None, batch: int) -> torch.Tensor:
    if shape is None:  # a token model: ids [batch, 16] within its embedding's vocabulary
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is None:
            raise SystemExit("mhc-fx: the model has no nn.Embedding; give --input-shape (e.g. 2,3,224,224)")
        return torch.randint(0, emb.num_embeddings, (batch, 16))
    dims = [int(d) for d in shape.split(",")]
    return torch.randn(batch, *dims[1:])


def _convert(args, console: Console):
    torch.manual_seed(0)
    model = _load(args.model).eval()
    config = MHCConfig(n=args.n, method=args.method)
    return model, convert(model, (_example(model, args.input_shape, 2),), config=config).eval()


def _run_convert(args, console: Console) -> None:
    model, converted = _convert(args, console)
    console.print(converted.report)
    x = _example(model, args.input_shape, 3)
    with torch.no_grad():
        out, ref = converted(x), model(x)
    err = float((out - ref).norm() / ref.norm())
    console.print(f"function preserved on a fresh input of shape {tuple(x.shape)}: relative error {err:.2e}")


def _run_export(args, console: Console) -> None:
    model, converted = _convert(args, console)
    report = export_onnx(
        converted, (_example(model, args.input_shape, 2),), args.out, functions=args.functions, verify=not args.no_verify
    )
    console.print(f"wrote {report.path}: opset {report.opset}, {report.nodes} nodes, inputs {report.inputs}")
    if report.functions:
        console.print(f"mhc_fx local functions (calls): {report.functions}")
    for check in report.checks:
        console.print(
            f"ONNX Runtime ({report.provider}) vs PyTorch on {check.shapes}: "
            f"max abs {check.max_abs:.2e}, relative {check.max_rel:.2e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-fx", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="factory 'module.path:callable' (default: %(default)s)")
    common.add_argument("--input-shape", help="example input shape, comma separated (default: token ids [2, 16])")
    common.add_argument("--method", default="mhc", choices=METHODS)
    common.add_argument("--n", type=int, default=4)
    sub = parser.add_subparsers(dest="command", metavar="{convert,export}")
    sub.add_parser("convert", parents=[common], help="convert and check (the default)")
    export = sub.add_parser("export", parents=[common], help="convert, export to ONNX, check in ONNX Runtime")
    export.add_argument("--out", default="model.onnx", help="the ONNX file (default: %(default)s)")
    export.add_argument("--functions", action="store_true", help="fold connections into mhc_fx ONNX functions")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["convert", *argv]
    args = parser.parse_args(argv)
    console = Console()
    try:
        {"convert": _run_convert, "export": _run_export}[args.command](args, console)
    except MHCError as err:
        console.print(f"mhc-fx: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mhc-fx``: convert a model and show what was converted.

    mhc-fx                                   # the embedded default: a small GPT, mHC n=4
    mhc-fx --model mypkg.models:build --input-shape 2,3,224,224 --method hc --n 2

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-fx", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="factory 'module.path:callable' (default: %(default)s)")
    parser.add_argument("--input-shape", help="example input shape, comma separated (default: token ids [2, 16])")
    parser.add_argument("--method", default="mhc", choices=METHODS)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args(argv)
    console = Console()
    torch.manual_seed(0)
    model = _load(args.model).eval()
    try:
        config = MHCConfig(n=args.n, method=args.method)
        converted = convert(model, (_example(model, args.input_shape, 2),), config=config).eval()
    except MHCError as err:
        console.print(f"mhc-fx: {err}")
        return 1
    console.print(converted.report)
    x = _example(model, args.input_shape, 3)
    with torch.no_grad():
        out, ref = converted(x), model(x)
    err = float((out - ref).norm() / ref.norm())
    console.print(f"function preserved on a fresh input of shape {tuple(x.shape)}: relative error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

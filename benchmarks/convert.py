"""Conversion time of a deep GPT-style model: the plan capture vs the passes vs the check.

    python benchmarks/convert.py [--layers 48] [--dim 256]

capture = one Dynamo capture of the example call traced to ATen, with the residual analysis;
passes = plan, connection modules, install; check = the first converted call (its own capture
and rewrite) and the original's forward, compared. ``method="residual"`` converts nothing, so it
has no row. Prints a table.
"""

import argparse
import copy
import statistics

import torch
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, dim=args.dim, layers=args.layers, heads=8)
    ids = torch.randint(0, 256, (2, 64))
    table = Table(title=f"convert(): GPT, {args.layers} layers, C={args.dim}, median of {args.repeats} (seconds)")
    for col in ("method", "blocks", "capture", "passes", "check", "total"):
        table.add_column(col, justify="right")
    for method in ("mhc", "hc"):
        runs = [mhc_fx.report(mhc_fx.convert(copy.deepcopy(model), (ids,), method=method)) for _ in range(args.repeats)]
        med = {k: statistics.median(r.seconds[k] for r in runs) for k in ("capture", "passes", "check")}
        table.add_row(method, str(runs[0].num_blocks), *(f"{med[k]:.3f}" for k in med), f"{sum(med.values()):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()

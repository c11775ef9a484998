"""Eager training-step time of a GPT under FSDP2 on one process (gloo, CPU): the original model
against the converted mHC model (n=4), each without FSDP2, as one unit, and with a unit per
block (``fully_shard`` per layer, then the model): the cost of running a converted model's
capture unit by unit (:mod:`mhc_fx.distributed`) next to the cost FSDP2 itself adds.

    python benchmarks/fsdp_step.py [--layers 12] [--dim 256] [--batch 8] [--seq 256] [--repeats 5]

Prints the median step (forward + backward + SGD; the rows' steps timed in turn, round by round)
and the first step (for a converted model: capture and rewrite included).
"""

import argparse
import copy
import socket
import statistics
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch.distributed.fsdp import fully_shard

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT


def sharded(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    """``model`` without FSDP2 (``none``), as one unit (``model``) or a unit per block (``layer``)."""
    if layout == "layer":
        for block in model.blocks:
            fully_shard(block)
    if layout != "none":
        fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (a.batch, a.seq))
    original = TinyGPT(layers=a.layers, dim=a.dim, max_len=a.seq)
    converted = mhc_fx.convert(copy.deepcopy(original), (ids,), n=4)
    rows = {
        f"{name}, FSDP2 {layout}": sharded(copy.deepcopy(model), layout)
        for name, model in (("original", original), ("mhc", converted))
        for layout in ("none", "model", "layer")
    }
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in rows.items()}

    def step(name: str) -> float:
        start = time.perf_counter()
        loss = rows[name](ids).float().square().mean()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        return time.perf_counter() - start

    first = {name: step(name) for name in rows}
    times = {name: [] for name in rows}
    for _ in range(a.repeats):
        for name in rows:
            times[name].append(step(name))
    dist.destroy_process_group()

    table = Table(title=f"FSDP2 train step, 1 process, {a.layers} layers, C={a.dim}, batch {a.batch} × {a.seq}")
    for column in ("model", "step ms (median)", "first step s"):
        table.add_column(column)
    for name in rows:
        table.add_row(name, f"{1e3 * statistics.median(times[name]):.1f}", f"{first[name]:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()

"""Registers, spills, shared memory and occupancy of every kernel, compiled for GPU targets on CPU.

    python benchmarks/kernel_resources.py                          # sm_80, sm_86, sm_90; n ∈ {1,2,4,8}; C=4096; fp32, bf16
    python benchmarks/kernel_resources.py --targets sm_90 --n 4 --C 1280 4096 --markdown

Each kernel is compiled (``mhc_fx.kernels.aot``: ``triton.compile`` for a ``GPUTarget``, no GPU
needed) with the launch configuration its launcher picks on that target, and the table gives its
tiles (BT tokens × BC channels per step; BK rows for the dφ kernel), warps and pipelining stages,
registers per thread and spill bytes (``ptxas -v``), shared memory (the compiled kernel's
metadata, what the launch requests), and the programs one SM holds by shared memory and by
registers. A shared-memory figure over the target's per-block limit means the launch would fail.
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from mhc_fx.kernels import aot, runtime

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
COLUMNS = ("kernel", "target", "n", "C", "dtype", "BT×BC", "warps", "stages", "regs", "spill B", "smem KiB",
           "CTAs/SM smem", "CTAs/SM regs")


def row(r: aot.Resources) -> tuple[str, ...]:
    """One table row of ``r``."""
    s, tiles = r.spec, r.launch.constexprs
    block = f"{tiles['BT']}×{tiles['BC']}" if "BC" in tiles else f"{tiles['BT']}×BK{tiles['BK']}"
    smem = f"{r.shared / 1024:.1f}" + ("" if r.fits else " (over)")
    dtype = next(name for name, d in DTYPES.items() if d == s.dtype)
    return (s.kernel, s.target, str(s.n), str(s.C), dtype, block, str(r.launch.num_warps),
            str(r.launch.num_stages), str(r.registers), str(r.spills), smem, str(r.ctas_by_smem), str(r.ctas_by_regs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(runtime.KERNELS), choices=runtime.KERNELS)
    parser.add_argument("--targets", nargs="+", default=list(runtime.TARGETS), choices=list(runtime.TARGETS))
    parser.add_argument("--n", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--C", nargs="+", type=int, default=[4096])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    if not aot.toolchain_available():
        raise SystemExit("needs Triton's NVIDIA backend (ptxas): pip install triton")
    specs = [aot.Spec(k, t, n, C, DTYPES[d]) for k in args.kernels for t in args.targets for n in args.n
             for C in args.C for d in args.dtypes]
    start = time.perf_counter()
    rows = [row(r) for r in aot.measure_all(specs).values()]
    elapsed = time.perf_counter() - start
    if args.markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
    else:
        table = Table(*COLUMNS, title=f"kernel resources (compiled on CPU in {elapsed:.0f} s)")
        for cells in rows:
            table.add_row(*cells)
        Console().print(table)


if __name__ == "__main__":
    main()

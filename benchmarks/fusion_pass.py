"""Wall time and peak extra memory of the ``mhc`` backend's fusion pass on deep, wide graphs
traced with fake tensors (no activation or weight is ever allocated at full size).

    python benchmarks/fusion_pass.py [--layers 12 48] [--channels 1024 4096] [--n 4]
                                     [--tokens 8x4096] [--dtype bfloat16] [--repeats 3]
                                     [--threads 1] [--inference] [--markdown] [--profile]

The model: ``--layers`` blocks, each an :class:`mhc_fx.nn.connections.MHCConnection` (RMS +
projection φ ``[nC, n²+2n]``, gates, 20 log-domain Sinkhorn iterations, ``H_pre·X``) around a
``Linear(C, C)`` branch, and its mixing ``H_res·X + H_postᵀ·y``; ``expand_streams`` before,
``reduce_streams`` after. It is built on the meta device; its call on an input ``[B, T, C]`` is
traced to pre-dispatch ATen by ``make_fx`` under a ``FakeTensorMode``, the parameters (fake, with
``requires_grad``) being graph inputs, as the ``mhc`` backend's ``to_aten`` gives it a Dynamo
graph. ``fuse_mhc`` then runs on it as ``MHCBackend.__call__`` calls it (the pass gives the
nodes it inserts their fake values itself, and runs its checks on one thread).

Figures per size:

- inputs GB: what the graph's inputs (``x`` and the parameters) would take as real tensors;
- nodes: graph nodes before → after the pass; pre / post_res / post_res_pre: fused ops by kind
  (a fully fused graph of L blocks has pre + post_res_pre = post_res + post_res_pre = L);
- trace: the ``make_fx`` trace (not part of the pass; the graph is traced afresh for each run);
- pass: ``fuse_mhc`` wall time (``time.perf_counter``), min and median of ``--repeats`` runs,
  and the median process CPU time of those runs (``time.process_time``; less sensitive to other
  load on the machine than the wall time);
- tracemalloc: peak Python-heap allocations during one more run, above the start
  (``tracemalloc``; it does not see the buffers of torch CPU tensors);
- RSS: peak resident set size during that run minus the RSS before it (psutil, sampled every
  2 ms by a thread; includes torch's tensors and allocator growth, not memory freed and reused);
  and the growth of ``ru_maxrss`` (0 when the run stays under the process's earlier peak).

A 2-layer pass runs first so that one-time process costs (lazy imports, dispatch caches) are
not charged to the first size. ``--threads`` sets ``torch.set_num_threads`` for the tracing
(the pass itself checks on one thread whatever it is).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import resource
import statistics
import threading
import time
import tracemalloc

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from mhc_fx.compile.fuse import fuse_mhc
from mhc_fx.kernels import custom_ops  # noqa: F401  (registers torch.ops.mhc_fx)
from mhc_fx.nn import functional as MF
from mhc_fx.nn.connections import MHCConnection

try:
    import psutil
except ImportError:  # RSS sampled from /proc instead
    psutil = None

#: the fused ops' CPU path, as the backend pins it by default (compile_cpu_ops=True).
CPU_PATH = "compiled_reference"


class Block(nn.Module):
    """One mHC block around a ``Linear(C, C)`` branch."""

    def __init__(self, n: int, channels: int, index: int) -> None:
        super().__init__()
        self.conn = MHCConnection(n, channels, index=index)
        self.branch = nn.Linear(channels, channels, bias=False)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h, H_post, H_res = self.conn(X)
        return self.conn.post(X, self.branch(h), H_post, H_res)


class Net(nn.Module):
    """``layers`` blocks on ``n`` streams of ``[B, T, C]`` tokens."""

    def __init__(self, layers: int, n: int, channels: int) -> None:
        super().__init__()
        self.n = n
        self.blocks = nn.ModuleList(Block(n, channels, i) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = MF.expand_streams(x, self.n, -2)
        for block in self.blocks:
            X = block(X)
        return MF.reduce_streams(X, -2)


class Case:
    """A size: the meta-device model, fake inputs and parameters, and a fresh trace on demand."""

    def __init__(self, layers: int, channels: int, n: int, tokens: tuple[int, int], dtype: torch.dtype) -> None:
        self.layers, self.channels, self.n, self.tokens = layers, channels, n, tokens
        with torch.device("meta"):
            self.net = Net(layers, n, channels)
        self.names = [name for name, _ in self.net.named_parameters()]
        self.mode = FakeTensorMode()
        with self.mode:
            x = torch.empty(*tokens, channels, dtype=dtype)
            params = [
                # connection parameters stay float32 (as MHCConnection keeps them); branches in the stream dtype
                torch.empty(p.shape, dtype=dtype if ".branch." in name else p.dtype).requires_grad_()
                for name, p in self.net.named_parameters()
            ]
        self.fakes = [x, *params]
        #: what the graph's inputs would take as real tensors (bytes)
        self.real_bytes = sum(t.numel() * t.element_size() for t in self.fakes)

    def run(self, x, *params):
        return torch.func.functional_call(self.net, dict(zip(self.names, params)), (x,))

    def trace(self) -> torch.fx.GraphModule:
        with torch.fx.traceback.preserve_node_meta(), self.mode:
            return make_fx(self.run, pre_dispatch=True)(*self.fakes)

    def fuse(self, gm: torch.fx.GraphModule, grad: bool):
        with torch.set_grad_enabled(grad):
            return fuse_mhc(gm, cross_layer=True, cpu_path=CPU_PATH)


def _rss() -> int:
    if psutil is not None:
        return psutil.Process().memory_info().rss
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RSSPeak:
    """Peak RSS while the ``with`` body runs, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(case: Case, repeats: int, grad: bool) -> dict:
    """Trace and fuse ``repeats`` times for the times, once more for the memory."""
    traces, walls, cpus, report, nodes = [], [], [], None, 0
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        gm = case.trace()
        traces.append(time.perf_counter() - t)
        nodes = len(gm.graph.nodes)
        gc.collect()
        w, c = time.perf_counter(), time.process_time()
        report = case.fuse(gm, grad)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        nodes_after = len(gm.graph.nodes)
        del gm
    gm = case.trace()
    gc.collect()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    with RSSPeak() as rss:
        case.fuse(gm, grad)
    py_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    maxrss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss  # KiB on Linux
    median = statistics.median(walls)
    return {
        "nodes": nodes, "nodes_after": nodes_after, "report": report, "trace": statistics.median(traces),
        "min": min(walls), "median": median, "cpu": statistics.median(cpus),
        "py_mb": py_peak / 2**20, "rss_mb": (rss.peak - rss.start) / 2**20, "maxrss_mb": maxrss_growth / 1024,
    }


def profile(case: Case, grad: bool, top: int = 10) -> str:
    """cProfile of one pass: the ``top`` functions by cumulative time, then by own time."""
    gm = case.trace()
    profiler = cProfile.Profile()
    profiler.enable()
    case.fuse(gm, grad)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _tokens(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--channels", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--n", type=int, nargs="+", default=[4])
    parser.add_argument("--tokens", type=_tokens, nargs="+", default=[(8, 4096)], help="batch×sequence, e.g. 8x4096")
    parser.add_argument("--dtype", default="bfloat16", help="stream and branch dtype (connection parameters stay float32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per size (each on a fresh trace)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--inference", action="store_true", help="grad disabled: the checks compare forward values only")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--profile", action="store_true", help="cProfile one pass of the last size: top 10 by cumulative and by own time")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    grad = not args.inference
    console = Console(width=max(Console().width, 160))

    warm = Case(2, 256, 4, (2, 8), dtype)
    warm.fuse(warm.trace(), grad)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table(
        title=(
            f"fuse_mhc on fake-tensor graphs ({args.dtype} streams, {'inference' if args.inference else 'training: forward + VJP checks'}, "
            f"{torch.get_num_threads()} torch thread(s), {args.repeats} repeats; load average {load})"
        )
    )
    columns = (
        "layers", "C", "n", "tokens", "inputs GB", "nodes", "pre", "post_res", "post_res_pre",
        "trace s", "pass min s", "pass med s", "CPU s", "tracemalloc MB", "RSS Δ MB", "maxrss Δ MB",
    )
    for col in columns:
        table.add_column(col, justify="right")
    problems, last, rows = [], None, []
    for layers in args.layers:
        for channels in args.channels:
            for n in args.n:
                for tokens in args.tokens:
                    case = Case(layers, channels, n, tokens, dtype)
                    r = measure(case, args.repeats, grad)
                    counts = r["report"].counts
                    rows.append((
                        str(layers), str(channels), str(n), f"{tokens[0]}×{tokens[1]}", f"{case.real_bytes / 1e9:.1f}",
                        f"{r['nodes']} → {r['nodes_after']}", str(counts["pre"]), str(counts["post_res"]),
                        str(counts["post_res_pre"]), f"{r['trace']:.2f}", f"{r['min']:.2f}", f"{r['median']:.2f}",
                        f"{r['cpu']:.2f}", f"{r['py_mb']:.1f}", f"{r['rss_mb']:.1f}", f"{r['maxrss_mb']:.1f}",
                    ))
                    table.add_row(*rows[-1])
                    if r["report"].num_pre != layers or r["report"].num_post_res != layers:
                        problems.append(f"{layers}×C={channels}×n={n}: not every block fused\n{r['report']}")
                    last = case
    console.print(table)
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    for problem in problems:
        console.print(f"[red]{problem}[/red]")
    if args.profile and last is not None:
        print(profile(last, grad))


if __name__ == "__main__":
    main()

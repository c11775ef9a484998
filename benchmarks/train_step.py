"""Training-step time and activation memory of a GPT before and after conversion, eager or
compiled.

    python benchmarks/train_step.py [--layers 12] [--dim 256] [--batch 8] [--seq 256] [--device cpu]
    python benchmarks/train_step.py --backend mhc [--no-plain-inductor]

Eager (default): the original model (baseline) against the converted mHC (n=4) and HC (n=4)
models: median forward time, median train-step time (forward + backward + AdamW), bytes of
tensors saved for backward (each storage counted once), each ratio to the baseline, and the
first call after ``.eval()`` (for a converted model a new specialisation: the cost of a new
capture and rewrite, plus the forward).

``--backend mhc``: ``torch.compile(fullgraph=True)`` of the baseline (Inductor) against the
converted mHC model compiled by the ``mhc`` backend (without and with selective recomputation;
on CPU also with ``cpu_ops_in_graph``) and by plain Inductor: the time of the first training step (Dynamo + fusion + AOTAutograd +
Inductor compile + the step; compile caches off), the median step (the rows' steps timed in
turn, round by round, after all first steps: this machine drifts by ~10 % within a run), and
saved bytes.
``--no-plain-inductor`` leaves out the last row (its compile of the unrolled Sinkhorn graphs
takes many minutes at the default size).
"""

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.compile import backend as mhc_backend
from mhc_fx.memory import saved_bytes
from mhc_fx.demo.zoo import TinyGPT


def timed(fn, repeats: int, device: str) -> float:
    """Median time of ``repeats`` calls of ``fn`` after a warm-up call (``repeats=0``: the time
    of that first call)."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)


def train_step(model, run, ids, targets):
    """One training step (forward + backward + AdamW) of ``model``, forward through ``run``
    (the model itself or its compiled form)."""
    opt = torch.optim.AdamW(mhc_fx.param_groups(model, 0.1), lr=1e-4)

    def step():
        loss = torch.nn.functional.cross_entropy(run(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(model, ids, targets, repeats, device):
    def forward():
        with torch.no_grad():
            model(ids)

    model.train()
    step = train_step(model, model, ids, targets)
    times = timed(forward, repeats, device), timed(step, repeats, device), saved_bytes(model, ids)
    model.eval()
    return (*times, timed(forward, 0, device))


def first_compiled_step(model, backend, ids, targets, device):
    """``(train step, first step s, saved bytes)`` of ``torch.compile(model, backend)``: the
    first step pays the whole compile (Dynamo's caches reset first: the fused ops' CPU path,
    shared by all blocks, is compiled again too)."""
    torch._dynamo.reset()
    model.train()
    compiled = torch.compile(model, backend=backend)
    step = train_step(model, compiled, ids, targets)
    first = timed(step, 0, device)
    return step, first, saved_bytes(compiled, ids)


def interleaved(steps, repeats: int, device: str) -> list[float]:
    """Median time of each of ``steps``, timed in turn ``repeats`` rounds (after a warm-up
    call each, which compiles again what a later row's reset dropped), so that the machine's
    drift during the run reaches every row alike."""
    times = [[] for _ in steps]
    for step in steps:
        step()
    for _ in range(repeats):
        for i, step in enumerate(steps):
            times[i].append(timed(step, 0, device))
    return [statistics.median(t) for t in times]


def eager_table(args, base, ids, targets) -> Table:
    table = _table(args, "eager", ("model", "forward ms", "×", "train step ms", "×", "saved MiB", "×", "first eval call s"))
    rows = [("baseline", base)]
    for method in ("mhc", "hc"):
        rows.append((f"{method} n={args.n}", mhc_fx.convert(copy.deepcopy(base), (ids[:2, :16],), n=args.n, method=method)))
    ref = None
    for name, model in rows:
        fwd, step, mem, first_eval = measure(model, ids, targets, args.repeats, args.device)
        values = (fwd * 1e3, step * 1e3, mem / 2**20)
        ref = ref or values
        table.add_row(name, *_with_ratios(values, ref), f"{first_eval:.2f}")
    return table


def compiled_table(args, base, ids, targets) -> Table:
    torch._inductor.config.force_disable_caches = True  # the first step pays the whole compile
    # one-time process costs (imports, compiler start-up) are paid here, not by the first row
    warm = torch.nn.Linear(4, 4).to(args.device)
    torch.compile(warm, fullgraph=True)(torch.ones(2, 4, device=args.device)).sum().backward()
    table = _table(args, "torch.compile", ("model", "backend", "first step s", "×", "train step ms", "×", "saved MiB", "×"))
    converted = mhc_fx.convert(copy.deepcopy(base), (ids[:2, :16],), n=args.n, method="mhc")
    rows = [
        ("baseline", base, "inductor"),
        (f"mhc n={args.n}", converted, "mhc"),
        (f"mhc n={args.n}", converted, mhc_backend.options(recompute=True)),
    ]
    if args.device == "cpu":
        rows.append((f"mhc n={args.n}", converted, mhc_backend.options(cpu_ops_in_graph=True)))
    if args.plain_inductor:
        rows.append((f"mhc n={args.n}", converted, "inductor"))
    firsts = [first_compiled_step(model, backend, ids, targets, args.device) for _, model, backend in rows]
    medians = interleaved([step for step, _, _ in firsts], args.repeats, args.device)
    ref = None
    for (name, _, backend), (_, first, mem), step in zip(rows, firsts, medians):
        values = (first, step * 1e3, mem / 2**20)
        ref = ref or values
        label = backend if isinstance(backend, str) else "mhc, " + ("recompute" if backend.options.recompute else "ops in graph")
        table.add_row(name, label, *_with_ratios(values, ref))
    return table


def _table(args, mode: str, columns) -> Table:
    table = Table(
        title=f"GPT {args.layers} layers, C={args.dim}, batch {args.batch}, seq {args.seq}, {mode}, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {args.repeats})"
    )
    for col in columns:
        table.add_column(col, justify="right")
    return table


def _with_ratios(values, ref) -> list[str]:
    """``[value, value/ref, ...]`` formatted for a table row."""
    return [cell for v, r in zip(values, ref) for cell in (f"{v:.1f}", f"{v / r:.2f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("eager", "mhc"), default="eager",
                        help="eager: no compile; mhc: torch.compile baseline vs backend 'mhc' vs plain Inductor")
    parser.add_argument("--no-plain-inductor", dest="plain_inductor", action="store_false",
                        help="with --backend mhc: skip the converted model under plain Inductor")
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = 256
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    targets = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    base = TinyGPT(vocab=vocab, dim=args.dim, layers=args.layers, heads=args.heads, max_len=args.seq).to(args.device)
    make = eager_table if args.backend == "eager" else compiled_table
    Console().print(make(args, base, ids, targets))


if __name__ == "__main__":
    main()

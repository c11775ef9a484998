"""Eager forward and training-step time, and activation memory, of a GPT before and after
conversion.

    python benchmarks/train_step.py [--layers 12] [--dim 256] [--batch 8] [--seq 256] [--device cpu]

Compares the original model (baseline) with the converted mHC (n=4) and HC (n=4) models:
median forward time, median train-step time (forward + backward + AdamW), bytes of tensors
saved for backward (each storage counted once), and each ratio to the baseline.
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.zoo import TinyGPT


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, ids, targets, repeats, device):
    opt = torch.optim.AdamW(mhc_fx.param_groups(model, 0.1), lr=1e-4)

    def forward():
        with torch.no_grad():
            model(ids)

    def step():
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    return timed(forward, repeats, device), timed(step, repeats, device), saved_bytes(model, ids)


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
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = 256
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    targets = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    base = TinyGPT(vocab=vocab, dim=args.dim, layers=args.layers, heads=args.heads, max_len=args.seq).to(args.device)
    rows = [("baseline", base)]
    for method in ("mhc", "hc"):
        rows.append((f"{method} n={args.n}", mhc_fx.convert(base, (ids[:2, :16],), n=args.n, method=method)))
    table = Table(
        title=f"GPT {args.layers} layers, C={args.dim}, batch {args.batch}, seq {args.seq}, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {args.repeats})"
    )
    for col in ("model", "forward ms", "×", "train step ms", "×", "saved MiB", "×"):
        table.add_column(col, justify="right")
    ref = None
    for name, model in rows:
        fwd, step, mem = measure(model, ids, targets, args.repeats, args.device)
        ref = ref or (fwd, step, mem)
        table.add_row(
            name, f"{fwd * 1e3:.1f}", f"{fwd / ref[0]:.2f}", f"{step * 1e3:.1f}", f"{step / ref[1]:.2f}",
            f"{mem / 2**20:.1f}", f"{mem / ref[2]:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()

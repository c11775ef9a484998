"""Training stability of mHC at a large learning rate: the demo's TinyGPT (24 layers, C=64, n=4)
on the standard library's source with AdamW at lr 3e-2, eager (the reference path).

    python benchmarks/stability.py [--steps 150] [--lr 3e-2] [--layers 24]

Every 25 steps it prints the loss, whether every gradient is finite, the largest spread
(max − min) of the Sinkhorn logits of one token over all blocks, and the smallest column sum of
``exp(logits − max)`` — where the paper's division form of Sinkhorn divides 0 by 0 once it
underflows (fp32: below ~1e-38). mhc_fx's Sinkhorn runs in the log domain, so the run stays
finite whatever that column sum does.
"""

import argparse

import torch
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.demo.data import VOCAB, CharBatches, encode, stdlib_text
from mhc_fx.demo.zoo import TinyGPT
from mhc_fx.nn.connections import Sinkhorn
from mhc_fx.optim import param_groups


class LogitWatch:
    """Forward hooks on every Sinkhorn module: the largest per-token logit spread and the
    smallest column sum of ``exp(logits − max)`` seen since the last :meth:`reset`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, Sinkhorn)]
        self.reset()

    def reset(self) -> None:
        self.spread, self.min_column = 0.0, float("inf")

    def _hook(self, module, args, output) -> None:
        logits = args[0].detach().float()
        top = logits.amax(dim=(-2, -1), keepdim=True)
        self.spread = max(self.spread, float((top - logits.amin(dim=(-2, -1), keepdim=True)).max()))
        self.min_column = min(self.min_column, float(torch.exp(logits - top).sum(dim=-2).min()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = encode(stdlib_text())
    batches = CharBatches(tokens, seed=0)
    model = TinyGPT(vocab=VOCAB, dim=64, layers=args.layers, heads=4, max_len=64)
    net = mhc_fx.convert(model, (batches.batch(2, 64)[0],), n=4)
    watch = LogitWatch(net)
    opt = torch.optim.AdamW(param_groups(net, 0.1), lr=args.lr, betas=(0.9, 0.95))
    table = Table(title=f"mHC TinyGPT {args.layers} layers, AdamW lr {args.lr}, eager")
    for col in ("step", "loss", "grads finite", "max logit spread", "min column sum exp(L−max)"):
        table.add_column(col, justify="right")
    finite = True
    for step in range(1, args.steps + 1):
        x, y = batches.batch(16, 64)
        watch.reset()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads_ok = all(bool(p.grad.isfinite().all()) for p in net.parameters() if p.grad is not None)
        finite &= grads_ok and bool(loss.isfinite())
        opt.step()
        if step % args.every == 0 or step == args.steps or not finite:
            table.add_row(str(step), f"{loss.item():.3f}", str(grads_ok), f"{watch.spread:.1f}", f"{watch.min_column:.1e}")
        if not finite:
            break
    Console().print(table)
    print("finite throughout" if finite else f"NOT FINITE at step {step}")


if __name__ == "__main__":
    main()

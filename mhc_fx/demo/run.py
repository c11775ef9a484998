"""``mhc-fx demo``: residual vs HC vs mHC on a deep pre-norm GPT, end to end.

Builds :class:`~mhc_fx.zoo.TinyGPT`, converts it with ``method="residual"``, ``"hc"`` and
``"mhc"``, trains each for the same steps on the standard library's source (characters), then
prints a table (losses, step time, parameters added, composite Amax gains), writes PNG plots
(loss curves, per-block composite gain) and exports the mHC model to ONNX, checked in ONNX
Runtime. No downloads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import statistics
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..convert import convert, is_converted, report
from .data import VOCAB, CharBatches, encode, stdlib_text
from ..diagnostics import BlockStats, mixing_stats
from ..optim import param_groups
from .zoo import TinyGPT

METHODS = ("residual", "hc", "mhc")


@dataclasses.dataclass
class DemoSettings:
    """The demo's knobs (defaults finish in a few minutes on 2 CPU cores)."""

    steps: int = 150
    n: int = 4
    layers: int = 12
    dim: int = 64
    heads: int = 4
    seq: int = 64
    batch: int = 16
    lr: float = 3e-3
    device: str = "cpu"
    out: pathlib.Path = pathlib.Path("mhc_demo")
    onnx: bool = True


@dataclasses.dataclass
class RunResult:
    method: str
    losses: list[float]
    val_loss: float
    step_ms: float
    new_parameters: int
    stats: list[BlockStats]

    @property
    def max_composite(self) -> tuple[float, float]:
        if not self.stats:
            return 1.0, 1.0  # the plain residual: identity mixing
        return max(s.composite_forward_gain for s in self.stats), max(s.composite_backward_gain for s in self.stats)


def _train(method: str, cfg: DemoSettings, train: CharBatches, val: CharBatches, progress: Progress):
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, max_len=cfg.seq)
    example = train.batch(2, cfg.seq)[0]
    net = convert(model, (example,), method=method, n=cfg.n).to(cfg.device)
    opt = torch.optim.AdamW(param_groups(net, 0.1), lr=cfg.lr, betas=(0.9, 0.95))
    task = progress.add_task(f"{method:>8}", total=cfg.steps)
    losses, times = [], []
    net.train()
    for _ in range(cfg.steps):
        x, y = (t.to(cfg.device) for t in train.batch(cfg.batch, cfg.seq))
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        progress.update(task, advance=1, description=f"{method:>8} loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        batches = [val.batch(cfg.batch, cfg.seq) for _ in range(8)]
        val_loss = statistics.mean(
            float(torch.nn.functional.cross_entropy(net(x.to(cfg.device)).flatten(0, 1), y.to(cfg.device).flatten()))
            for x, y in batches
        )
        stats = mixing_stats(net, batches[0][0].to(cfg.device)) if method != "residual" else []
    result = RunResult(method, losses, val_loss, 1e3 * statistics.median(times), report(net).new_parameters if is_converted(net) else 0, stats)
    return net, example, result


def _table(results: list[RunResult], cfg: DemoSettings) -> Table:
    table = Table(title=f"TinyGPT {cfg.layers} layers (C={cfg.dim}), n={cfg.n}, {cfg.steps} steps on stdlib source, {cfg.device}")
    for col in ("method", "train loss", "val loss", "step ms", "params added", "max composite fwd gain", "max composite bwd gain"):
        table.add_column(col, justify="right")
    for r in results:
        fwd, bwd = r.max_composite
        tail = statistics.mean(r.losses[-10:])
        table.add_row(r.method, f"{tail:.3f}", f"{r.val_loss:.3f}", f"{r.step_ms:.1f}", f"{r.new_parameters:,}", f"{fwd:.3g}", f"{bwd:.3g}")
    return table


def _plots(results: list[RunResult], out: pathlib.Path, console: Console) -> list[pathlib.Path]:
    if importlib.util.find_spec("matplotlib") is None:
        console.print("plots skipped: matplotlib is not installed (pip install 'mhc_fx[plots]')")
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r.losses, label=r.method)
    ax.set(xlabel="step", ylabel="train loss", title="training loss")
    ax.legend()
    losses = out / "loss.png"
    fig.savefig(losses, dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.stats:
            ax.plot([s.composite_forward_gain for s in r.stats], marker="o", label=f"{r.method} forward")
            ax.plot([s.composite_backward_gain for s in r.stats], marker="x", linestyle="--", label=f"{r.method} backward")
    ax.set(xlabel="block", ylabel="composite Amax gain", yscale="log", title="composite mixing gain along the stream")
    ax.legend()
    gains = out / "gain.png"
    fig.savefig(gains, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [losses, gains]


def run_demo(cfg: DemoSettings, console: Console | None = None) -> list[RunResult]:
    """Run the demo; returns one result per method (also printed and plotted)."""
    console = console or Console()
    cfg.out.mkdir(parents=True, exist_ok=True)
    tokens = encode(stdlib_text())
    split = int(0.9 * len(tokens))
    train, val = CharBatches(tokens[:split], seed=0), CharBatches(tokens[split:], seed=1)
    console.print(f"corpus: {len(tokens):,} characters of the Python standard library; vocabulary {VOCAB}")
    results, nets = [], {}
    with Progress(console=console, transient=False) as progress:
        for method in METHODS:
            net, example, result = _train(method, cfg, train, val, progress)
            results.append(result)
            nets[method] = (net, example)
    console.print(_table(results, cfg))
    for path in _plots(results, cfg.out, console):
        console.print(f"wrote {path}", soft_wrap=True)
    if cfg.onnx:
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
            console.print("ONNX export skipped: pip install 'mhc_fx[onnx]'")
        else:
            from ..export.onnx import export_onnx

            net, example = nets["mhc"]
            report = export_onnx(net.cpu(), (example,), cfg.out / "mhc.onnx")
            worst = max(c.max_rel for c in report.checks)
            console.print(
                f"wrote {report.path}: verified in ONNX Runtime on {len(report.checks)} shapes (relative error ≤ {worst:.1e})",
                soft_wrap=True,
            )
    return results

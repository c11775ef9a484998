"""Hand-built models, one per residual shape the conversion must handle."""

import torch
import torch.nn.functional as F
from torch import nn


class PostNorm(nn.Module):
    """BERT-style: ``x = ln(x + f(x))`` per block."""

    def __init__(self, dim=16, layers=3):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])
        self.lns = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])

    def forward(self, x):
        for fc, ln in zip(self.fcs, self.lns):
            x = ln(x + torch.tanh(fc(x)))
        return x


class BranchFirst(nn.Module):
    """``f(x) + x``, ``torch.add(x, f(x))`` and ``x.add(f(x))`` spellings."""

    def __init__(self, dim=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = torch.relu(self.a(x)) + x
        x = torch.add(x, self.b(x))
        return x.add(self.c(x))


class InPlace(nn.Module):
    """timm-style ``out += shortcut`` followed by an in-place ReLU."""

    def __init__(self, dim=16, layers=3):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        for fc in self.fcs:
            shortcut = x
            out = fc(x)
            out += shortcut
            x = self.act(out)
        return x


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + shortcut)


class TinyResNet(nn.Module):
    """Two identity blocks, a projection-shortcut block (not converted), one more identity."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 12, 2), BasicBlock(12, 12))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Nested(nn.Module):
    """An outer residual whose branch holds an inner residual on a different value."""

    def __init__(self, dim=16):
        super().__init__()
        self.w0, self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        u = self.w0(x)
        inner = u + self.w1(torch.relu(u))
        return x + self.w2(torch.relu(inner))


class SideReader(nn.Module):
    """A stream value also read by a non-residual consumer (an auxiliary head)."""

    def __init__(self, dim=16):
        super().__init__()
        self.f, self.g, self.aux = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x1 = x + self.f(x)
        aux = self.aux(x1)
        x2 = x1 + self.g(x1)
        return x2, aux


class TinyUNet(nn.Module):
    """Concatenation skips only: nothing to convert."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, 2, 1)
        self.mid = nn.Conv2d(8, 8, 3, 1, 1)
        self.up = nn.ConvTranspose2d(16, 4, 2, 2)
        self.out = nn.Conv2d(7, 3, 1)

    def forward(self, x):
        d = torch.relu(self.down(x))
        m = torch.relu(self.mid(d))
        u = self.up(torch.cat([m, d], 1))
        return self.out(torch.cat([u, x], 1))


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class DataDependent(nn.Module):
    """Python control flow on tensor values: Dynamo cannot capture it in one graph."""

    def __init__(self, dim=16):
        super().__init__()
        self.f = nn.Linear(dim, dim)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.f(x)
        return x - self.f(x)


class PaperStyleMHC(nn.Module):
    """An mHC residual block written from the paper, without mhc_fx: a Linear-style projection
    weight ``[n²+2n, nC]`` applied after an rsqrt RMS norm, three scalar gates, one bias sliced
    three ways, einsum mixes and a Python Sinkhorn loop.

    Variants (each a different function, or a different gradient, from mhc_fx's op unless said):
    ``iters`` Sinkhorn iterations (any count is the op's function); ``log_domain`` spells the
    loop with ``logsumexp`` (the same function); ``rows_first`` normalises rows first;
    ``stop`` puts a stop-gradient in: ``"sinkhorn"`` detaches H_res, ``"h_pre"`` detaches H_pre,
    ``"rms"`` computes the RMS statistic from a detached X, ``"data"`` reads it from ``X.data``,
    ``"no_grad"`` computes it under ``torch.no_grad()``.
    """

    def __init__(self, dim: int, n: int, rows_first: bool = False, iters: int = 10, stop: str | None = None,
                 log_domain: bool = False) -> None:
        super().__init__()
        self.n, self.rows_first, self.iters, self.stop, self.log_domain = n, rows_first, iters, stop, log_domain
        k = n * n + 2 * n
        self.weight = nn.Parameter(torch.randn(k, n * dim) * 0.1)
        self.bias = nn.Parameter(torch.randn(k) * 0.3)
        self.gate_pre, self.gate_post, self.gate_res = (nn.Parameter(torch.tensor(v)) for v in (0.8, 0.6, 1.1))
        self.branch = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _mean_square(self, flat: torch.Tensor) -> torch.Tensor:
        if self.stop == "rms":
            flat = flat.detach()
        elif self.stop == "data":
            flat = flat.data
        elif self.stop == "no_grad":
            with torch.no_grad():
                return (flat * flat).mean(-1, keepdim=True)
        return (flat * flat).mean(-1, keepdim=True)

    def _sinkhorn(self, logits: torch.Tensor) -> torch.Tensor:
        axes = (3, 2) if self.rows_first else (2, 3)
        if self.log_domain:
            for _ in range(self.iters):
                logits = logits - torch.logsumexp(logits, dim=axes[0], keepdim=True)
                logits = logits - torch.logsumexp(logits, dim=axes[1], keepdim=True)
            return logits.exp()
        M = logits.exp()
        for _ in range(self.iters):
            M = M / torch.sum(M, dim=axes[0], keepdim=True)
            M = M / torch.sum(M, dim=axes[1], keepdim=True)
        return M

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # X [B, T, n, C]
        B, T, n, C = X.shape
        flat = X.reshape(B, T, n * C)
        logits = F.linear(flat * torch.rsqrt(self._mean_square(flat) + 1e-6), self.weight)
        b = self.bias
        H_pre = torch.sigmoid(self.gate_pre * logits[..., :n] + b[:n])
        H_post = 2 * torch.sigmoid(self.gate_post * logits[..., n : 2 * n] + b[n : 2 * n])
        M = self._sinkhorn((self.gate_res * logits[..., 2 * n :] + b[2 * n :]).view(B, T, n, n))
        if self.stop == "sinkhorn":
            M = M.detach()
        if self.stop == "h_pre":
            H_pre = H_pre.detach()
        y = self.branch(torch.einsum("btn,btnc->btc", H_pre, X))
        return torch.einsum("btij,btjc->btic", M, X) + H_post.unsqueeze(-1) * y.unsqueeze(-2)


class PaperStyleNet(nn.Module):
    """An embedding into n different streams (equal streams would hide H_res: rows summing to
    1 mix equal streams into themselves), then ``PaperStyleMHC`` blocks (``variants``: their
    keyword arguments; default: two plain blocks and one that normalises rows first), then the
    streams flattened."""

    def __init__(self, dim: int = 24, n: int = 4, variants: list[dict] | None = None) -> None:
        super().__init__()
        self.n = n
        self.embed = nn.Linear(dim, n * dim)
        variants = variants if variants is not None else [{}, {}, {"rows_first": True}]
        self.blocks = nn.ModuleList([PaperStyleMHC(dim, n, **v) for v in variants])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = self.embed(x).unflatten(-1, (self.n, -1))
        for block in self.blocks:
            X = block(X)
        return X.flatten(-2)

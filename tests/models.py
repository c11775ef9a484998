"""Hand-built models, one per residual shape the conversion must handle."""

import torch
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

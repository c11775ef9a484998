"""Residual shapes that once broke the rewrite silently (found in review): each must keep the
function at other input shapes and give every connection a gradient."""

import pytest
import torch
from torch import nn

import mhc_fx
from mhc_fx.nn import Connection

from .conftest import rel_err

D = 8


class PadMask(nn.Module):
    """An in-place write through a slice inside the branch (padding mask)."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, x, pad):
        for f in self.fcs:
            h = f(x)
            h[:, 1:].masked_fill_(pad[:, 1:, None], 0.0)
            x = x + h
        return x


class ScaledSlice(nn.Module):
    """A stream value modified in place through a slice between blocks."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        x = x + self.f(x)
        x[..., :2] *= 0.5
        return x + self.g(x)


class Fork(nn.Module):
    """One value is the skip input of two blocks."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        y = x + self.a(x)
        return y + self.b(y), y + self.c(y)


class NestedBranchOut(nn.Module):
    """The outer branch's output is the inner residual's add."""

    def __init__(self):
        super().__init__()
        self.ln, self.g = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        y = self.ln(x)
        return x + (y + self.g(y))


class Constant(nn.Module):
    """A tensor constant in forward (export lifts it onto the graph module)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(D, D)

    def forward(self, x):
        return x + self.f(x) * torch.tensor(0.5)


class ChannelFirstLinear(nn.Module):
    """Channel-first stream whose branch is a linear over permuted channels."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

    def forward(self, x):  # [B, C, H, W]
        for fc in self.fcs:
            x = x + fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class ConformerConv(nn.Module):
    """Feature-last stream whose branch is a convolution over the transposed sequence."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.conv = nn.Conv1d(D, D, 3, padding=1)
        self.fc = nn.Linear(D, D)

    def forward(self, x):  # [B, T, C]
        x = x + self.conv(self.ln(x).transpose(1, 2)).transpose(1, 2)
        return x + self.fc(x)


def _pad(b, t, cut):
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[:, cut:] = True
    return pad


CASES = {
    "pad_mask": (PadMask, lambda b, t: (torch.randn(b, t, D), _pad(b, t, t)), 2),
    "scaled_slice": (ScaledSlice, lambda b, t: (torch.randn(b, t, D),), 1),
    "fork": (Fork, lambda b, t: (torch.randn(b, t, D),), 3),
    "nested_branch_out": (NestedBranchOut, lambda b, t: (torch.randn(b, t, D),), 2),
    "constant": (Constant, lambda b, t: (torch.randn(b, t, D),), 1),
    "channel_first_linear": (ChannelFirstLinear, lambda b, t: (torch.randn(b, D, t, t),), 2),
    "conformer_conv": (ConformerConv, lambda b, t: (torch.randn(b, t, D),), 2),
}


def _leaves(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", list(CASES))
def test_function_and_gradients(name):
    factory, make, blocks = CASES[name]
    model = factory().eval()
    converted = mhc_fx.convert(model, make(2, 5), n=2)
    assert mhc_fx.report(converted).num_blocks == blocks, str(mhc_fx.report(converted))
    args = make(3, 7)
    if name == "pad_mask":
        args = (args[0], _pad(3, 7, 4))  # real padding, unlike the example
    converted.eval()
    with torch.no_grad():
        for out, ref in zip(_leaves(converted(*[a.clone() for a in args])), _leaves(model(*[a.clone() for a in args]))):
            assert rel_err(out, ref) <= 1e-5
    # a step away from the init, then every connection's parameters get a gradient
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.05 * torch.randn_like(p))
    converted.train()
    sum(o.square().sum() for o in _leaves(converted(*args))).backward()
    for conn_name, conn in converted.named_modules():
        if isinstance(conn, Connection):
            grads = [p.grad for p in conn.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), conn_name


def test_feature_axis_inferred_from_weight_dims():
    report = mhc_fx.find_residuals(ChannelFirstLinear(), (torch.randn(2, D, 5, 5),))
    assert [b.feature_dim for b in report.blocks] == [1, 1]
    report = mhc_fx.find_residuals(ConformerConv(), (torch.randn(2, 5, D),))
    assert [b.feature_dim for b in report.blocks] == [-1, -1]

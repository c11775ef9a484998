"""Stability diagnostics of converted models: Amax gains of the residual mixing (mHC §2.2),
coefficient statistics and gradient norms per block.

The forward gain of a mixing matrix is its largest absolute row sum, the backward gain its
largest absolute column sum. For a stream ``X_{l+1} = H_res^(l) X_l + ...`` the composite
mixing after block l is ``H_res^(l) ⋯ H_res^(0)``; its gains, averaged over tokens, show
whether signals (forward) or gradients (backward) can grow or vanish along the identity path.
mHC keeps every per-block forward gain at exactly 1; HC's matrices are unconstrained.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .convert import is_converted, report
from .nn import functional as MF
from .nn.connections import Connection


def forward_gain(H: torch.Tensor) -> torch.Tensor:
    """Largest absolute row sum of ``H [..., n, n]`` → ``[...]``."""
    return H.abs().sum(dim=-1).amax(dim=-1)


def backward_gain(H: torch.Tensor) -> torch.Tensor:
    """Largest absolute column sum of ``H [..., n, n]`` → ``[...]``."""
    return H.abs().sum(dim=-2).amax(dim=-1)


def composite(Hs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Running products ``H_l ⋯ H_0`` of per-token matrices ``[T, n, n]`` (one per block)."""
    out, P = [], None
    for H in Hs:
        P = H if P is None else H @ P
        out.append(P)
    return out


@dataclasses.dataclass
class BlockStats:
    """Diagnostics of one converted block (gains averaged over tokens).

    Attributes:
        name: the connection module's path; stream / index: its place; forward_gain,
        backward_gain: of its own H_res; composite_forward_gain, composite_backward_gain: of the
        product of H_res from the stream's first block to this one; h_pre, h_post, h_res:
        ``(mean, min, max)`` of the coefficients.
    """

    name: str
    stream: int
    index: int
    forward_gain: float
    backward_gain: float
    composite_forward_gain: float
    composite_backward_gain: float
    h_pre: tuple[float, float, float]
    h_post: tuple[float, float, float]
    h_res: tuple[float, float, float]


def _summary(t: torch.Tensor) -> tuple[float, float, float]:
    return float(t.mean()), float(t.min()), float(t.max())


@torch.no_grad()
def mixing_stats(model: nn.Module, *args, **kwargs) -> list[BlockStats]:
    """Run ``model`` once (in its current mode) and return the stats of every connection.

    Blocks are grouped into streams by the model's :func:`mhc_fx.report`; composite gains run
    along each stream.
    """
    captured: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Connection):

            def hook(mod, inputs, output, name=name):
                H_pre, H_post, H_res = mod.coefficients(MF.to_token_layout(inputs[0], mod.stream_dim))
                n = mod.n
                captured[name] = (H_pre.reshape(-1, n), H_post.reshape(-1, n), H_res.reshape(-1, n, n))

            hooks.append(module.register_forward_hook(hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    blocks = report(model).blocks if is_converted(model) else None
    order = [(b.module, b.stream, b.index) for b in blocks] if blocks else [(n, 0, i) for i, n in enumerate(captured)]
    stats, products = [], {}
    for name, stream, index in order:
        H_pre, H_post, H_res = captured[name]
        P = H_res if index == 0 or stream not in products else H_res @ products[stream]
        products[stream] = P
        stats.append(
            BlockStats(
                name, stream, index,
                float(forward_gain(H_res).mean()), float(backward_gain(H_res).mean()),
                float(forward_gain(P).mean()), float(backward_gain(P).mean()),
                _summary(H_pre), _summary(H_post), _summary(H_res),
            )
        )
    return stats


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each connection and of each block's branch module (after a
    backward pass), keyed by module path."""
    out = {}
    blocks = report(model).blocks if is_converted(model) else []
    names = [b.module for b in blocks] + [b.name for b in blocks]
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        grads = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
        if grads:
            out[name] = float(torch.stack(grads).norm())
    return out

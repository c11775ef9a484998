"""Find Sinkhorn chains: the anchors of mHC pre sides in an ATen graph.

Two spellings of the same function (DESIGN §2) are recognised on an ``[..., n, n]`` tensor:

- **division** (the paper's): ``M = exp(L)``, then alternately ``M / M.sum(-2)`` (columns) and
  ``M / M.sum(-1)`` (rows);
- **log domain** (mhc_fx's reference): alternately ``L − logsumexp(L, -2)`` and
  ``L − logsumexp(L, -1)`` (or ``log_softmax`` over the axis), then ``exp``.

A chain of ``t`` (column, row) pairs is what ``mhc_pre(..., iters=t)`` computes; any other
order of axes (rows first, or ending on columns) is a different function and is reported.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .nodes import owner, shape
from .report import Unfused

aten = torch.ops.aten
MAX_STREAMS = 8
_LOG_SOFTMAX = (aten._log_softmax.default, aten.log_softmax.int)


@dataclasses.dataclass(frozen=True)
class SinkhornChain:
    """``iters`` (column, row) normalisations of an ``[..., n, n]`` tensor: ``start`` is the
    chain's first node (the ``exp``, or the first log normalisation) and ``end`` its result."""

    start: fx.Node
    end: fx.Node
    n: int
    iters: int


def _axis(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


def _division_step(m: fx.Node, ndim: int) -> tuple[int, fx.Node] | None:
    """``(axis, m / m.sum(axis, keepdim=True))`` for a user of ``m``, axis -2 or -1."""
    for s in m.users:
        if s.target is not aten.sum.dim_IntList or s.args[0] is not m or len(s.args[1]) != 1:
            continue
        keepdim = s.args[2] if len(s.args) > 2 else s.kwargs.get("keepdim", False)
        axis = _axis(s.args[1][0], ndim)
        divisors = [s] if keepdim else [u for u in s.users if u.target is aten.unsqueeze.default and u.args[1] in (axis, axis + ndim)]
        for d in m.users:
            if d.target is aten.div.Tensor and d.args[0] is m and d.args[1] in divisors and axis in (-2, -1):
                return axis, d
    return None


def _log_step(m: fx.Node, ndim: int) -> tuple[int, fx.Node] | None:
    """``(axis, m − logsumexp(m, axis, keepdim=True))`` (or ``log_softmax(m, axis)``) for a user of ``m``."""
    for u in m.users:
        if u.target in _LOG_SOFTMAX and u.args[0] is m and _axis(u.args[1], ndim) in (-2, -1):
            return _axis(u.args[1], ndim), u
        if u.target is aten.logsumexp.default and u.args[0] is m and len(u.args[1]) == 1:
            keepdim = u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)
            axis = _axis(u.args[1][0], ndim)
            if not keepdim or axis not in (-2, -1):
                continue
            for d in m.users:
                if d.target is aten.sub.Tensor and d.args[0] is m and d.args[1] is u and len(d.args) == 2:
                    return axis, d
    return None


def _is_log_step(node: fx.Node) -> bool:
    if node.target in _LOG_SOFTMAX:
        return True
    return (
        node.target is aten.sub.Tensor and isinstance(node.args[1], fx.Node)
        and node.args[1].target is aten.logsumexp.default and node.args[1].args[0] is node.args[0]
    )


def _follow(node: fx.Node, step, ndim: int) -> tuple[list[int], list[fx.Node]]:
    axes, nodes, m = [], [], node
    while (found := step(m, ndim)) is not None:
        axes.append(found[0])
        nodes.append(found[1])
        m = found[1]
    return axes, nodes


def sinkhorn_chains(graph: fx.Graph) -> tuple[list[SinkhornChain], list[Unfused]]:
    """Every Sinkhorn chain in ``graph``, and the normalisation chains that are not one (wrong
    order of axes, ending on a column step)."""
    chains, rejected = [], []
    for node in graph.nodes:
        s = shape(node)
        if s is None or len(s) < 2 or s[-1] != s[-2] or not 1 <= s[-1] <= MAX_STREAMS:
            continue
        if node.target is aten.exp.default:
            axes, steps = _follow(node, _division_step, len(s))
            start, end = node, steps[-1] if steps else None
        elif not _is_log_step(node):
            axes, steps = _follow(node, _log_step, len(s))
            exps = [u for u in steps[-1].users if u.target is aten.exp.default] if steps else []
            if not exps:
                continue
            start, end = steps[0], exps[0]
        else:
            continue
        if not axes:
            continue
        if axes == [-2, -1] * (len(axes) // 2):
            chains.append(SinkhornChain(start, end, s[-1], len(axes) // 2))
        else:
            order = "".join("c" if a == -2 else "r" for a in axes)
            rejected.append(Unfused("pre", owner([start]), f"Sinkhorn steps {order!r} are not (column, row) pairs"))
    return chains, rejected

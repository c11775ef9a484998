"""Find Sinkhorn chains: the anchors of mHC pre sides in an ATen graph.

Three spellings are recognised on an ``[..., n, n]`` tensor, and each chain says which
:class:`~mhc_fx.nn.functional.Form` it computes (its Sinkhorn part: start, order, epsilon):

- **division** (the paper's): ``M = exp(L)``, then alternately ``M / M.sum(-2)`` (columns) and
  ``M / M.sum(-1)`` (rows);
- **log domain** (mhc_fx's reference): alternately ``L − logsumexp(L, -2)`` and
  ``L − logsumexp(L, -1)`` (or ``log_softmax`` over the axis), then ``exp``;
- **division with epsilons** (DeepSeek-V4's): ``M = softmax_rows(L) + ε`` (the softmax, or
  ``exp(L − rowmax) / rowsum``), then ``M / (M.sum(axis) + ε)`` from the columns on,
  alternating, ending on columns.

Any other order of axes (rows first is another function; the log domain's finiteness at any
logit spread is the paper form's, which a division op would not keep), or an epsilon anywhere
else (after a division, in some denominators only, in the softmax's), is another function:
close to one of these at ordinary logits but not equal, and reported, not fused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..nn.functional import PAPER, Form
from .nodes import owner, shape
from .fusion_report import Unfused

aten = torch.ops.aten
MAX_STREAMS = 8
_LOG_SOFTMAX = (aten._log_softmax.default, aten.log_softmax.int)
_SOFTMAX = (aten._softmax.default, aten.softmax.int)
_ADD = (aten.add.Tensor, aten.add.Scalar)


@dataclasses.dataclass(frozen=True)
class SinkhornChain:
    """``iters`` normalisation pairs of an ``[..., n, n]`` tensor as ``form`` spells them (its
    ``pre_eps`` and ``transposed`` are not the chain's to say: the pre side's match decides):
    ``start`` is the chain's first node (the ``exp`` or softmax, or the first log
    normalisation) and ``end`` its result."""

    start: fx.Node
    end: fx.Node
    n: int
    iters: int
    form: Form = PAPER


def _axis(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


def _plus_constant(node: fx.Node, of: fx.Node) -> float | None:
    """``c`` where ``node`` is ``of + c`` for a Python float ``c`` (either order), else None."""
    if node.target not in _ADD or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    c = b if a is of else a if b is of else None
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None


def _division_step(m: fx.Node, ndim: int) -> tuple[tuple[int, float], fx.Node] | None:
    """``((axis, ε), m / (m.sum(axis, keepdim=True) + ε))`` for a user of ``m`` (axis -2 or -1;
    ``ε = 0`` when nothing is added to the sum)."""
    for s in m.users:
        if s.target is not aten.sum.dim_IntList or s.args[0] is not m or len(s.args[1]) != 1:
            continue
        keepdim = s.args[2] if len(s.args) > 2 else s.kwargs.get("keepdim", False)
        axis = _axis(s.args[1][0], ndim)
        sums = [s] if keepdim else [u for u in s.users if u.target is aten.unsqueeze.default and u.args[1] in (axis, axis + ndim)]
        divisors = {**{d: 0.0 for d in sums}, **{u: c for d in sums for u in d.users if (c := _plus_constant(u, d)) is not None}}
        for d in m.users:
            if d.target is aten.div.Tensor and d.args[0] is m and d.args[1] in divisors and axis in (-2, -1):
                return (axis, divisors[d.args[1]]), d
    return None


def _division_or_epsilon_step(m: fx.Node, ndim: int) -> tuple[tuple[int, float], fx.Node] | None:
    """:func:`_division_step`, or ``((0, ε), m + ε)``: an epsilon added to the iterate itself."""
    found = _division_step(m, ndim)
    if found is not None:
        return found
    for u in m.users:
        if (c := _plus_constant(u, m)) is not None and c > 0:
            return (0, c), u
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


def _spelling(steps: list[tuple[int, float]]) -> str:
    """``steps`` as a string: ``c``/``r`` a column/row division (``~`` when by ``sum + ε``),
    ``+`` an epsilon added to the iterate."""
    return "".join("+" if axis == 0 else ("c" if axis == -2 else "r") + ("~" if eps else "") for axis, eps in steps)


def _division_form(steps: list[tuple[int, float]]) -> tuple[Form, int] | str:
    """The form and iteration count of a division chain's ``steps`` (from its start: a softmax
    start is its rows division), or why no form of mHC spells them so."""
    axes = [axis for axis, _ in steps]
    epsilons = {eps for _, eps in steps}
    if epsilons == {0.0} and 0 not in axes:
        if len(axes) % 2 == 0 and axes == [-2, -1] * (len(axes) // 2):
            return PAPER, len(axes) // 2
        return f"Sinkhorn steps {_spelling(steps)!r} are not (column, row) pairs"
    head, tail = steps[:2], steps[2:]
    eps = head[1][1] if len(head) == 2 else 0.0
    tail_axes = [axis for axis, _ in tail]
    if (
        head == [(-1, 0.0), (0, eps)] and tail and all(e == eps for _, e in tail) and len(tail) % 2 == 1
        and tail_axes == [-2, -1] * (len(tail) // 2) + [-2]
    ):
        form = Form("deepseek_v4", softmax_start=True, res_eps=eps, columns_first=False)
        return form, (len(tail) + 1) // 2
    return (
        f"Sinkhorn steps {_spelling(steps)!r} put their epsilons where no form of mHC does (DeepSeek-V4's: "
        "softmax over rows + ε, then columns and rows alternately divided by sum + ε, ending on columns: "
        "'r+c~r~…c~'); a close function, not an equal one"
    )


def sinkhorn_chains(graph: fx.Graph) -> tuple[list[SinkhornChain], list[Unfused]]:
    """Every Sinkhorn chain in ``graph``, and the normalisation chains that are not one (another
    order of axes, another placement of the epsilons)."""
    chains, rejected = [], []
    for node in graph.nodes:
        s = shape(node)
        if s is None or len(s) < 2 or s[-1] != s[-2] or not 1 <= s[-1] <= MAX_STREAMS:
            continue
        softmax = node.target in _SOFTMAX and _axis(node.args[1], len(s)) == -1
        if node.target is aten.exp.default or softmax:
            steps, nodes = _follow(node, _division_or_epsilon_step, len(s))
            steps = [(-1, 0.0), *steps] if softmax else steps
            while steps and steps[-1][0] == 0:  # an epsilon added after the last division is not the chain's
                steps, nodes = steps[:-1], nodes[:-1]
            if not nodes:
                continue
            found = _division_form(steps)
            if isinstance(found, str):
                rejected.append(Unfused("pre", owner([node]), found))
            else:
                chains.append(SinkhornChain(node, nodes[-1], s[-1], found[1], found[0]))
            continue
        if not _is_log_step(node):
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

"""Match the mixing ``X_next = H_res·X + H_postᵀ·y`` of a fused pre side (or
``H_resᵀ·X + H_postᵀ·y``: DeepSeek-V4 mixes with the transpose of its Sinkhorn result, and
``post_res`` then reads ``H_res`` transposed).

The candidate is the nearest node below ``H_res`` and ``H_post`` with the stream's shape that
is computed from ``X`` (or an equal view of the same tensor), ``H_post``, ``H_res`` and one
``[..., C]`` tensor ``y`` alone (within
:data:`MIX_DEPTH` ops); it is accepted when, on a few tokens, its values and VJPs equal
:func:`mhc_fx.nn.functional.post_res_mix`'s (:mod:`mhc_fx.compile.check`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..nn import functional as Fn
from ..graph.ops import tensor_meta
from . import check
from .nodes import inputs, nondeterministic, order, shape, size_input, users, walk

#: how far (in ops) the mixing ``X_next`` may lie from its inputs.
MIX_DEPTH = 8


@dataclasses.dataclass
class PostMatch:
    """``X_next`` (the node ``post_res`` replaces), the branch output ``y`` it mixes in, and
    whether it mixes with ``H_resᵀ``."""

    X_next: fx.Node
    y: fx.Node
    transposed: bool = False


def _closure(target: fx.Node, sources: set[fx.Node]) -> list[fx.Node] | None:
    """Nodes computing ``target`` from ``sources`` (and constants) alone, within ``MIX_DEPTH``
    ops; None if ``target`` needs anything else."""
    seen, frontier = {target}, [target]
    for _ in range(MIX_DEPTH):
        nxt = []
        for node in frontier:
            for src in node.all_input_nodes:
                if src in sources or src in seen:
                    continue
                if (src.op == "placeholder" and size_input(src) is None) or nondeterministic(src):
                    return None
                seen.add(src)
                nxt.append(src)
        frontier = nxt
        if not frontier:
            return sorted(seen, key=order)
    return None


def _mix(values: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    """``post_res_mix(X, y, H_post, H_res)``, with ``H_resᵀ`` when ``transposed``."""
    X, y, H_post, H_res = values
    return Fn.post_res_mix(X, y, H_post, H_res.transpose(-2, -1) if transposed else H_res)


def _copies(X: fx.Node) -> list[fx.Node]:
    """Other nodes computing exactly ``X``: the same view op with the same arguments (a
    convolution net's connection takes the stream into token layout once for its pre side and
    once for its mixing — two equal ``permute`` nodes)."""
    if not isinstance(X.target, torch._ops.OpOverload) or not X.target.is_view or not X.all_input_nodes:
        return []
    base = X.all_input_nodes[0]
    return [u for u in base.users if u is not X and u.target is X.target and u.args == X.args and u.kwargs == X.kwargs]


def match_post(
    gm: fx.GraphModule, X: fx.Node, H_post: fx.Node, H_res: fx.Node, modes: dict[fx.Node, bool], draws: check.Draws
) -> PostMatch | str:
    """The node computing ``post_res_mix(X, y, H_post, H_res)`` for some ``y [..., C]``, or why
    there is none (``modes``: each node's grad mode; ``draws``: the pass's random check values)."""
    s, dtype = shape(X), tensor_meta(X).dtype
    y_shape = s[:-2] + s[-1:]
    near = walk(H_res, users, lambda _: True, MIX_DEPTH)
    after_post = walk(H_post, users, lambda _: True, MIX_DEPTH)
    tokens = check.TokenSlice.of(s)
    copies = {u: X for u in _copies(X)}
    reason = "no node computes H_res·X + H_postᵀ·y from this block's coefficients"
    for target in sorted((u for u in near if u in after_post and shape(u) == s), key=order):
        if tensor_meta(target).dtype != dtype:
            continue
        back = walk(target, inputs, lambda _: True, MIX_DEPTH)
        for y in sorted(back, key=lambda u: back[u]):
            if y in (X, H_post, H_res) or y in copies or shape(y) != y_shape or y in near:
                continue
            sources = (X, y, H_post, H_res)
            nodes = _closure(target, {*sources, *copies})
            if nodes is None:
                continue
            values = {u: draws.like(u, slot, tokens) for slot, u in enumerate(sources)}
            values[H_res] = values[H_res].abs()
            sizes = {u: tokens.size(hint) for u in nodes if (hint := size_input(u)) is not None}
            try:
                with torch.no_grad():
                    env = {**values, **sizes, **{c: values[X] for c in copies}}
                    value = check.evaluate(gm, nodes, env, tokens)[target]
            except RuntimeError:
                continue
            exact = [values[u].to(torch.float64).cpu() for u in sources]
            orientations = [t for t in (False, True) if check.rel_err(value, _mix(exact, t)) <= check.tolerance(dtype)]
            if not orientations:
                continue
            transposed = orientations[0]
            stop = check.stop_gradient(nodes, [], modes)
            if stop is None and any(modes[u] for u in nodes):
                names = dict(zip(sources, ("the stream X", f"the branch output {y.name}", "H_post", "H_res")))
                stop = check.vjp_mismatch(
                    gm, nodes, values, [(target, 0)], lambda v: [_mix(v, transposed)], tokens, modes, names, sizes, copies
                )
            if stop is None:
                return PostMatch(target, y, transposed)
            reason = f"the mixing at {target.name}: {stop}"
    return reason

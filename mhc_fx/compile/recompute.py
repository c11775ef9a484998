"""Selective recomputation of the n-stream activations (mHC §4.3.2), as a joint-graph pass.

Training an n-stream model saves each block's stream ``X_l [..., n, C]`` for backward: n times
the activations of the residual stream it replaced. mHC keeps only every ``L_r``-th stream
``X_{l0}`` and each branch output ``y_l [..., C]``, and recomputes the rest in backward from
those by rerunning the mixing (never the branch ``F``, nor the coefficients)::

    X_{l+1} = post_res(X_l, y_l, H_post_l, H_res_l)

The pass adds that ``post_res`` chain to the joint graph for every stream inside a segment,
points the backward's reads of those streams at it, and tags it with ``CheckpointPolicy`` (the
tags selective activation checkpointing uses): the chain is ``MUST_RECOMPUTE``, segment-start
streams, branch outputs and the fused pre ops' ``H_post``, ``H_res`` (``n² + n`` values per
token) are ``MUST_SAVE``; the min-cut partitioner does the rest. Recomputing costs one mixing per block
(a read of ``X_l`` and ``y_l``, a write of ``X_{l+1}``) and never the Sinkhorn iterations, which
the pre side's backward recomputes on its own anyway. Saved stream memory drops from ``L·nC``
to about ``(L/L_r)·nC + L·C`` per token, which ``L_r = √(nL/(n+2))`` (the paper's choice, the
default) minimises.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy


def segment_length(n: int, blocks: int) -> int:
    """Default ``L_r = round(√(n·L/(n+2)))`` (≥ 1) for ``blocks`` blocks of ``n`` streams."""
    return max(1, round(math.sqrt(n * blocks / (n + 2))))


def _downstream(nodes: list[fx.Node]) -> set[fx.Node]:
    """Every node computed from ``nodes`` (the backward part of a joint graph, from its tangents)."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _redirect(value: fx.Node, recomputed: fx.Node, backward: set[fx.Node]) -> None:
    """The backward's reads of ``value`` read ``recomputed`` instead."""
    for user in [u for u in value.users if u in backward]:
        user.replace_input_with(value, recomputed)


def _stream_and_mixing(pre: fx.Node) -> tuple[fx.Node, tuple | None]:
    """The stream a fused pre op reads (``post_res_pre``: the ``X_next`` it computes) and the
    mixing that made it, ``(X, y, H_post, H_res, path)``, or None (the stream's start)."""
    ops = torch.ops.mhc_fx
    if pre.target is ops.post_res_pre.default:
        stream = next(u for u in pre.users if u.target is operator.getitem and u.args[1] == 0)
        return stream, (*pre.args[:4], pre.args[9])
    stream = pre.args[0]
    if stream.target is ops.post_res.default:
        return stream, tuple(stream.args[:5])
    return stream, None


class SelectiveRecompute(CustomGraphPass):
    """Inductor ``joint_custom_post_pass`` that plans which stream tensors are recomputed.

    Args:
        every: ``L_r``, blocks per segment (``None``: :func:`segment_length`).
        on_plan: called with a one-line description of the plan it applied.
    """

    def __init__(self, every: int | None = None, on_plan=None) -> None:
        if every is not None and every < 1:
            raise ValueError(f"recompute_every must be ≥ 1 (blocks per saved stream), got {every}")
        self.every, self.on_plan = every, on_plan

    def __call__(self, graph: fx.Graph) -> None:
        ops = torch.ops.mhc_fx
        pres = [n for n in graph.nodes if n.target in (ops.mhc_pre.default, ops.post_res_pre.default)]
        # AOTAutograd names a joint graph's incoming gradients tangents_1, tangents_2, ...
        tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
        if not pres or not tangents:  # an inference graph saves nothing
            return
        backward = _downstream(tangents)
        first_backward = next(n for n in graph.nodes if n in backward)
        n = pres[0].meta["val"][2].shape[-1]
        every = self.every or segment_length(n, len(pres))
        recomputed: dict[fx.Node, fx.Node] = {}  # forward stream → its recomputation
        for index, pre in enumerate(pres):
            first = 1 if pre.target is ops.post_res_pre.default else 0  # outputs (X_next,) h, H_pre, H_post, H_res
            outputs = {u.args[1] - first: u for u in pre.users if u.target is operator.getitem}
            for i in (2, 3):  # H_post, H_res (n² + n values per token) for the mixings' backward: saved
                if i in outputs:
                    outputs[i].meta["recompute"] = CheckpointPolicy.MUST_SAVE
            stream, mixing = _stream_and_mixing(pre)
            if mixing is not None:
                mixing[1].meta["recompute"] = CheckpointPolicy.MUST_SAVE  # branch output y
            if index % every == 0 or mixing is None:
                stream.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                continue
            X, y, H_post, H_res, path = mixing
            with graph.inserting_before(first_backward):
                again = graph.call_function(ops.post_res.default, (recomputed.get(X, X), y, H_post, H_res, path))
            again.meta.update(val=stream.meta["val"], recompute=CheckpointPolicy.MUST_RECOMPUTE)
            recomputed[stream] = again
            _redirect(stream, again, backward)
        if self.on_plan is not None:
            saved = math.ceil(len(pres) / every)
            self.on_plan(f"L_r={every}: {saved} of {len(pres)} block streams saved, the rest recomputed in backward")

    def uuid(self) -> None:
        """None: graphs with this pass skip Inductor's and AOTAutograd's caches — a cache hit
        would not run the pass, and the plan would be missing from the fusion report."""
        return None

"""Selective recomputation of the n-stream activations (mHC §4.3.2), as a joint-graph pass.

Training an n-stream model saves each block's stream ``X_l [..., n, C]`` for backward: n times
the activations of the residual stream it replaced. mHC keeps only every ``L_r``-th stream
``X_{l0}`` and each branch output ``y_l [..., C]``, and recomputes the rest in backward from
those by rerunning the cheap fused ops (never the branch ``F``)::

    X_{l+1} = post_res(X_l, y_l, H_post_l, H_res_l),   (h, H_pre, H_post, H_res)_l = mhc_pre(X_l)

The pass tags the fused forward ops of the joint graph with ``CheckpointPolicy`` (the tags
selective activation checkpointing uses) and the min-cut partitioner does the rest: ops of
blocks inside a segment are ``MUST_RECOMPUTE``; segment-start streams and branch outputs are
``MUST_SAVE``. Saved stream memory drops from ``L·nC`` to about ``(L/L_r)·nC + L·C`` per token,
which ``L_r = √(nL/(n+2))`` (the paper's choice, the default) minimises.
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


def _tag(node: fx.Node, policy: CheckpointPolicy) -> None:
    node.meta["recompute"] = policy
    for user in node.users:
        if user.target is operator.getitem:
            user.meta["recompute"] = policy


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
        has_backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        if not pres or not has_backward:  # an inference graph saves nothing
            return
        n = pres[0].meta["val"][2].shape[-1]
        every = self.every or segment_length(n, len(pres))
        for node in graph.nodes:
            if node.target in (ops.post_res.default, ops.post_res_pre.default):
                node.args[1].meta["recompute"] = CheckpointPolicy.MUST_SAVE  # branch output y
        for index, pre in enumerate(pres):
            merged = pre.target is ops.post_res_pre.default
            producer = pre if merged else pre.args[0]
            if index % every:
                _tag(pre, CheckpointPolicy.MUST_RECOMPUTE)
                if producer.target is ops.post_res.default:
                    _tag(producer, CheckpointPolicy.MUST_RECOMPUTE)
            elif merged:
                stream = next((u for u in pre.users if u.args[1] == 0), None)
                if stream is not None:
                    stream.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            else:
                producer.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        if self.on_plan is not None:
            saved = math.ceil(len(pres) / every)
            self.on_plan(f"L_r={every}: {saved} of {len(pres)} block streams saved, the rest recomputed in backward")

    def uuid(self) -> None:
        """None: graphs with this pass skip Inductor's and AOTAutograd's caches — a cache hit
        would not run the pass, and the plan would be missing from the fusion report."""
        return None

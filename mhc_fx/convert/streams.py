"""Pass: chain residual blocks into streams.

Block k+1 continues block k's stream when k's add reaches k+1's skip input through stream-wise
ops only (elementwise activations, dropout, a broadcast scale, a norm over the feature axis as
in post-norm models): those ops are applied to every stream. Anything else — a projection
shortcut, a reshape, a pooling — ends the stream; the next block starts a new one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch.fx as fx

from ..graph import ops
from .residuals import Residual, mutated_values


@dataclasses.dataclass(eq=False)
class Stream:
    """Blocks sharing one n-stream residual, in order.

    Attributes:
        blocks: the residuals; links[k]: the stream-wise nodes from ``blocks[k].add`` to
        ``blocks[k+1].skip`` (empty when the add feeds the next block directly; the last
        node is the next skip); feature_dim: the feature axis (1 or -1).
    """

    blocks: list[Residual]
    links: list[list[fx.Node]]
    feature_dim: int

    @property
    def stream_dim(self) -> int:
        """Where the stream axis sits in the stream tensor (right before the feature axis)."""
        return -2 if self.feature_dim == -1 else self.feature_dim


def _link(start: fx.Node, skips: dict[fx.Node, Residual], feature_dim: int, mutated: set[fx.Node]):
    """Follow stream-wise ops from ``start`` to the skip input of another block (never through a
    value modified in place)."""
    if start in mutated:  # later readers see the modified value: the stream ends here
        return None, []
    if start in skips:
        return skips[start], []
    frontier = [(start, [])]
    while frontier:
        node, path = frontier.pop(0)
        for user in node.users:
            if ops.stream_wise_input(user, feature_dim) is not node or user in mutated:
                continue
            if user in skips:
                return skips[user], path + [user]
            frontier.append((user, path + [user]))
    return None, []


def group_streams(gm: fx.GraphModule, residuals: list[Residual]) -> list[Stream]:
    """Group ``residuals`` (in graph order) into streams.

    A value that is the skip input of several blocks (a fork, ``y + b(y)`` and ``y + c(y)``)
    continues no stream: the stream before it ends there and each block starts its own.
    """
    readers = Counter(r.skip for r in residuals)
    skips = {r.skip: r for r in residuals if readers[r.skip] == 1}
    mutated = mutated_values(gm)
    nxt: dict[Residual, tuple[Residual, list[fx.Node]]] = {}
    has_prev: set[Residual] = set()
    for res in residuals:
        succ, path = _link(res.add, skips, res.feature_dim, mutated)
        if succ is None or succ in has_prev or succ.feature_dim != res.feature_dim or succ.channels != res.channels:
            continue
        nxt[res] = (succ, path)
        has_prev.add(succ)
    streams = []
    for res in residuals:
        if res in has_prev:
            continue
        blocks, links = [res], []
        while blocks[-1] in nxt:
            succ, path = nxt[blocks[-1]]
            links.append(path)
            blocks.append(succ)
        streams.append(Stream(blocks, links, res.feature_dim))
    return streams

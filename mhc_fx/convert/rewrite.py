"""Pass: rewrite each stream of residual blocks into its n-stream form.

For a stream of blocks ``k = 0..L-1`` (``x_{k+1} = x_k + F_k(x_k)``)::

    X_0 = expand(x_0)                                   stream start      [..., n, C]
    h_k, H_post, H_res = connection_k(X_k)              replaces x_k in F_k's inputs
    X'_k = post_res_mix(X_k, F_k(h_k), H_post, H_res)   replaces the add
    X_{k+1} = link ops applied to X'_k                  stream-wise ops between blocks
    reduce(X)                                           for every other reader of a stream value

:func:`rewrite_graph` matches a capture against the plan and attaches the plan's modules (the
model's own, at the same paths) to the captured graph before rewriting it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import torch.fx as fx
from torch import nn

from .inplace import functionalize_intermediate_inplace
from .plan import STREAMS_MODULE, Plan, match
from .residuals import Residual, SkippedAdd, find_residual_adds
from .streams import Stream, group_streams


@dataclasses.dataclass
class Analysis:
    """A captured graph's residual blocks (graph order), their streams, and the adds left alone."""

    gm: fx.GraphModule
    residuals: list[Residual]
    streams: list[Stream]
    skipped: list[SkippedAdd]


def analyse(gm: fx.GraphModule, feature_dim: int | None, param_inputs: set[fx.Node] = frozenset()) -> Analysis:
    functionalize_intermediate_inplace(gm)
    residuals, skipped = find_residual_adds(gm, feature_dim, param_inputs)
    return Analysis(gm, residuals, group_streams(gm, residuals), skipped)


def lookup(root: nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` of ``root``, or None."""
    try:
        return functools.reduce(getattr, path.split("."), root)
    except AttributeError:
        return None


def register(tree: nn.Module, path: str, module: nn.Module) -> None:
    """Add ``module`` at ``path`` of ``tree``, creating empty containers where a parent is missing."""
    *parents, name = path.split(".")
    owner = tree
    for part in parents:
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(name, module)


def _insert(graph: fx.Graph, after: fx.Node, op: str, target, args) -> fx.Node:
    with graph.inserting_after(after):
        return graph.create_node(op, target, args)


#: node meta of an activation-checkpointed region (:func:`mhc_fx.graph.capture.to_aten`)
CHECKPOINT_TAGS = ("recompute", "ac_graph_id")


def _checkpointed_like(source: fx.Node, *nodes: fx.Node) -> None:
    """Tag ``nodes`` (a block's connection) for recomputation as ``source`` (the block's residual
    add) is: a connection belongs to its block, inside the block's checkpointed region."""
    for node in nodes:
        node.meta.update({k: source.meta[k] for k in CHECKPOINT_TAGS if k in source.meta})


class _Reducer:
    """Lazily inserts one ``reduce`` per stream value that something outside the stream reads,
    and records it in ``replaced`` (original node → the node now holding its value)."""

    def __init__(self, graph: fx.Graph, target: str, replaced: dict[fx.Node, fx.Node]) -> None:
        self.graph, self.target, self.replaced, self.made = graph, target, replaced, {}

    def __call__(self, stream_value: fx.Node) -> fx.Node:
        if stream_value not in self.made:
            self.made[stream_value] = _insert(self.graph, stream_value, "call_module", self.target, (stream_value,))
        return self.made[stream_value]

    def redirect(self, original: fx.Node, stream_value: fx.Node, keep: set[fx.Node]) -> None:
        """Readers of ``original`` not in ``keep`` read the reduced stream instead."""
        for user in list(original.users):
            if user not in keep:
                self.replaced[original] = self(stream_value)
                user.replace_input_with(original, self.replaced[original])


def rewrite_stream(
    gm: fx.GraphModule,
    stream: Stream,
    connections: list[str],
    expand: str,
    reduce: str,
    replaced: dict[fx.Node, fx.Node],
) -> list[fx.Node]:
    """Rewrite one stream in ``gm.graph``; returns the original nodes it made dead.

    Streams must be rewritten in graph order of their first block, sharing ``replaced``: an
    earlier stream may have replaced a value a later one starts from (a fork) or adds (a
    residual nested in another's branch).

    Args:
        connections: module path of each block's connection (``len(stream.blocks)``); the
            block's post/res mixing is its ``post`` submodule.
        expand / reduce: module paths of the stream's :class:`StreamExpand` / :class:`StreamReduce`.
        replaced: original node → the node holding its value since an earlier rewrite.
    """
    graph = gm.graph
    reducer = _Reducer(graph, reduce, replaced)
    dead: list[fx.Node] = []
    first = replaced.get(stream.blocks[0].skip, stream.blocks[0].skip)
    X = _insert(graph, first, "call_module", expand, (first,))
    for k, (block, conn) in enumerate(zip(stream.blocks, connections)):
        skip = first if k == 0 else block.skip
        pre = _insert(graph, X, "call_module", conn, (X,))
        h = _insert(graph, pre, "call_function", operator.getitem, (pre, 0))
        H_post = _insert(graph, h, "call_function", operator.getitem, (pre, 1))
        H_res = _insert(graph, H_post, "call_function", operator.getitem, (pre, 2))
        for user in list(skip.users):
            if user in block.branch:
                user.replace_input_with(skip, h)
        if k > 0:  # x_k is a stream value now: its other readers get the reduced stream
            reducer.redirect(block.skip, X, keep={block.add})
        y = replaced.get(block.branch_out, block.branch_out)
        X = _insert(graph, block.add, "call_module", f"{conn}.post", (X, y, H_post, H_res))
        _checkpointed_like(block.add, pre, h, H_post, H_res, X)
        original = block.add
        dead.append(original)
        for node in stream.links[k] if k < len(stream.links) else []:
            reducer.redirect(original, X, keep={node})
            src = original
            with graph.inserting_after(node):
                X = graph.node_copy(node, lambda n, src=src, X=X: X if n is src else n)
            X.meta = {k: v for k, v in X.meta.items() if k not in ("val", "tensor_meta", "example_value")}
            dead.append(node)
            original = node
        if k == len(stream.blocks) - 1:
            reducer.redirect(original, X, keep=set())
    return dead


def erase_dead(gm: fx.GraphModule, dead: list[fx.Node]) -> None:
    """Erase the replaced nodes, then every pure node left without readers; lint."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(dead, key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or n.is_impure())
    gm.graph.lint()


def rewrite_graph(gm: fx.GraphModule, a: Analysis, plan: Plan, model: nn.Module, context: str) -> None:
    """Rewrite a capture's graph with the plan's modules (read from ``model``, attached to ``gm``
    at the same paths); raises ConversionError when the capture does not match the plan."""
    paths = match(plan, a.streams, a.residuals, context)
    for i, names in enumerate(paths):
        for path in names:
            register(gm, path, model.get_submodule(path))
        register(gm, f"{STREAMS_MODULE}.{i}", model.get_submodule(f"{STREAMS_MODULE}.{i}"))
    dead: list[fx.Node] = []
    replaced: dict[fx.Node, fx.Node] = {}
    for i, (stream, names) in enumerate(zip(a.streams, paths)):  # streams are in graph order
        ends = f"{STREAMS_MODULE}.{i}"
        dead += rewrite_stream(gm, stream, names, f"{ends}.expand", f"{ends}.reduce", replaced)
    erase_dead(gm, dead)
    gm.recompile()

"""Pass: rewrite each stream of residual blocks into its n-stream form.

For a stream of blocks ``k = 0..L-1`` (``x_{k+1} = x_k + F_k(x_k)``)::

    X_0 = expand(x_0)                                   stream start      [..., n, C]
    h_k, H_post, H_res = connection_k(X_k)              replaces x_k in F_k's inputs
    X'_k = post_res_mix(X_k, F_k(h_k), H_post, H_res)   replaces the add
    X_{k+1} = link ops applied to X'_k                  stream-wise ops between blocks
    reduce(X)                                           for every other reader of a stream value

The connection modules must already be submodules of ``gm`` (the rewrite only adds nodes).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .streams import Stream


def _insert(graph: fx.Graph, after: fx.Node, op: str, target, args) -> fx.Node:
    with graph.inserting_after(after):
        return graph.create_node(op, target, args)


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
    """Erase the replaced nodes, then every pure node left without readers; lint. (The graph
    is compiled once, when :class:`~mhc_fx.ConvertedModel` binds it.)"""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(dead, key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or n.is_impure())
    gm.graph.lint()

"""Cross-layer fusion: ``mhc_pre(post_res(...))`` of consecutive blocks becomes one
``post_res_pre`` op (the pre side reads X_next from registers instead of memory)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph.ops import canonical
from .nodes import number, order


def insert_op(graph: fx.Graph, before: fx.Node, target, args: tuple, outputs: int) -> list[fx.Node]:
    """Insert ``target(*args)`` before ``before``; its ``outputs`` getitem nodes."""
    with graph.inserting_before(before):
        op = graph.call_function(target, args)
        return [graph.call_function(operator.getitem, (op, i)) for i in range(outputs)]


def _hoist(node: fx.Node, before: fx.Node) -> None:
    """Move ``node`` and the inputs it needs in front of ``before`` (they read parameters only)."""
    if order(node) < order(before):
        return
    for src in node.all_input_nodes:
        _hoist(src, before)
    before.prepend(node)
    node.meta["_order"] = order(before) - 0.5


def merge_cross_layer(graph: fx.Graph, pre_ops: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Replace each ``mhc_pre`` in ``pre_ops`` whose stream is a ``post_res`` output by
    ``post_res_pre``; returns ``{pre op: post_res op}`` of the merged pairs."""
    number(graph)
    merged = {}
    for op in pre_ops:
        producer = canonical(op.args[0])
        if producer.target is not torch.ops.mhc_fx.post_res.default:
            continue
        X, y, H_post, H_res, path = producer.args
        _, phi, alpha, bias, iters, eps, _, form = op.args
        for arg in (phi, alpha, bias):
            _hoist(arg, producer)
        args = (X, y, H_post, H_res, phi, alpha, bias, iters, eps, path, form)
        outs = insert_op(graph, producer, torch.ops.mhc_fx.post_res_pre.default, args, 5)
        for user in list(op.users):
            user.replace_all_uses_with(outs[1 + user.args[1]])
        producer.replace_all_uses_with(outs[0])
        merged[op] = producer
    return merged

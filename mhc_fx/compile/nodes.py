"""Facts about the nodes of the ATen graphs the fusion passes read: concrete shapes, graph
order, the owning module, size inputs, and bounded walks (a pass looks at a window of the
graph around each candidate, never at the whole graph per candidate)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx as fx

from ..graph.ops import module_path, tensor_meta

aten = torch.ops.aten


def shape(node: fx.Node) -> tuple[int, ...] | None:
    """Concrete shape of a node's value (symbolic sizes at their hint), None if not a tensor."""
    val = tensor_meta(node)
    if val is None:
        return None
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape)


def number(graph: fx.Graph) -> None:
    """Record each node's position (``order``) in ``graph``."""
    for i, node in enumerate(graph.nodes):
        node.meta["_order"] = i


def order(node: fx.Node) -> float:
    """The node's position, as :func:`number` recorded it."""
    return node.meta["_order"]


def owner(nodes: Iterable[fx.Node]) -> str:
    """The innermost module path of the first node that has one."""
    for node in nodes:
        path = module_path(node)
        if path:
            return path[-1]
    return ""


def size_input(node: fx.Node) -> int | None:
    """The hint of a symbolic size that is a graph input (``dynamic=True`` graphs), else None."""
    val = node.meta.get("val")
    if node.op == "placeholder" and isinstance(val, torch.SymInt):
        return int(val.node.hint)
    return None


def is_const(node: fx.Node) -> bool:
    """A node whose value does not depend on any graph input (a factory or a constant)."""
    return node.op == "get_attr" or (node.op == "call_function" and not node.all_input_nodes)


def nondeterministic(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (a dropout in eval mode, ``train=False``, does not)."""
    if node.target in (aten.dropout.default, aten.native_dropout.default):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is not False
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def inputs(node: fx.Node) -> list[fx.Node]:
    return node.all_input_nodes


def walk(
    start: fx.Node, step: Callable[[fx.Node], list[fx.Node]], keep: Callable[[fx.Node], bool], depth: int | None = None
) -> dict[fx.Node, int]:
    """Breadth-first walk from ``start`` along ``step`` (:func:`users` or :func:`inputs`),
    entering only nodes where ``keep`` holds, at most ``depth`` steps: ``{node: distance}``
    (``start`` at 0)."""
    seen, frontier, d = {start: 0}, [start], 0
    while frontier and (depth is None or d < depth):
        d += 1
        nxt = []
        for node in frontier:
            for other in step(node):
                if other not in seen and keep(other):
                    seen[other] = d
                    nxt.append(other)
        frontier = nxt
    return seen

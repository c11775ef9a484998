"""Pass: find the identity residual additions ``x + f(x)`` of a captured graph.

An add of ``a`` and ``b`` is a residual when both are tensors of equal shape and dtype and ``a``
(after view-like no-ops: alias, clone, same-dtype ``to``, inactive dropout) is a strict ancestor
of ``b`` through a path that holds an op with weights (a linear, conv or matmul with a
parameter, trainable or frozen). Every other add of two tensors is reported with the reason it
was left alone.
The graph analysis uses networkx.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import networkx as nx
import torch
import torch.fx as fx

from ..graph import ops
from ..graph.ops import module_path


@dataclasses.dataclass(eq=False)
class Residual:
    """One identity residual ``add = skip + branch_out`` (``skip`` canonicalised).

    Attributes:
        add: the add node; skip: the stream value ``x``; branch_out: the operand ``f(x)``;
        branch: nodes between ``skip`` and ``branch_out`` (the body of ``f``, ``branch_out``
        included); owner: module path of the add (from ``nn_module_stack``); child: the
        submodule of ``owner`` that holds the branch's weights, if one does; feature_dim: 1
        when the branch starts with a convolution (channel-first), else -1; channels: C.
    """

    add: fx.Node
    skip: fx.Node
    branch_out: fx.Node
    branch: frozenset[fx.Node]
    owner: str
    child: str | None
    feature_dim: int
    channels: int

    @property
    def name(self) -> str:
        """Readable block name, e.g. ``model.layers.3.mlp``."""
        parts = [p for p in (self.owner, self.child) if p]
        return ".".join(parts) or self.add.name


@dataclasses.dataclass(frozen=True)
class SkippedAdd:
    """An add of two tensors that is not converted, and why."""

    node: str
    owner: str
    reason: str


def mutated_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose storage an in-place op left in the graph writes to (through views)."""
    out = set()
    for node in gm.graph.nodes:
        target = ops.mutated_input(node)
        if target is not None:
            out.add(ops.alias_base(target))
    return out


def _between(g: nx.DiGraph, nodes: list[fx.Node], order: dict[fx.Node, int], src: fx.Node, dst: fx.Node) -> frozenset[fx.Node]:
    """Nodes on paths from ``src`` to ``dst`` (``dst`` included, ``src`` not); empty when
    ``src`` is not an ancestor of ``dst``. The search stays within the graph-order window
    between the two (fx graphs are topologically ordered), so a block costs its own size."""
    lo, hi = order[src], order[dst]
    if lo >= hi:
        return frozenset()
    window = g.subgraph(nodes[lo : hi + 1])
    up = nx.ancestors(window, dst)
    if src not in up:
        return frozenset()
    return frozenset((up & nx.descendants(window, src)) | {dst})


def _child_of(owner: str, weighted: list[fx.Node]) -> str | None:
    """The submodule of ``owner`` most branch weights live in (``self_attn`` of ``layers.0``)."""
    prefix = owner + "." if owner else ""
    names = Counter()
    for node in weighted:
        for path in module_path(node):
            if path.startswith(prefix) and len(path) > len(prefix):
                names[path[len(prefix):].split(".")[0]] += 1
                break
    return names.most_common(1)[0][0] if names else None


def _static(size) -> int | None:
    if isinstance(size, torch.SymInt):
        size = size.node.maybe_as_int()
    return size if isinstance(size, int) else None


def _feature_dim(skip: fx.Node, first_weighted: fx.Node, params: set[fx.Node]) -> int:
    """The feature axis of a residual stream: 1 (channel-first) or -1 (feature-last).

    The axis whose static size is one of the first weighted op's weight dims (its input
    features or channels) wins; when both or neither match (or no shapes were recorded), a
    convolution means channel-first and anything else feature-last.
    """
    guess = 1 if ops.is_conv(first_weighted) else -1
    meta = ops.tensor_meta(skip)
    weights = [ops.tensor_meta(n) for n in first_weighted.all_input_nodes if n in params]
    weight_dims = {_static(d) for w in weights if w is not None for d in w.shape}
    if meta is None or meta.dim() < 3 or not weight_dims:
        return guess
    matches = [axis for axis in (1, -1) if _static(meta.shape[axis]) in weight_dims]
    return matches[0] if len(matches) == 1 else guess


def _channels(operands: tuple[fx.Node, fx.Node], feature_dim: int) -> int | None:
    """C: the static feature size of the residual (from either operand's recorded shape); None
    when it is dynamic or unrecorded."""
    for node in operands:
        meta = ops.tensor_meta(node)
        if meta is not None:
            c = _static(meta.shape[feature_dim])
            if c is not None:
                return c
    return None


def _same_tensor_type(a: fx.Node, b: fx.Node) -> str | None:
    """None when a and b have equal shape and dtype (or no recorded shapes), else the reason."""
    ma, mb = ops.tensor_meta(a), ops.tensor_meta(b)
    if ma is None or mb is None:
        return None
    if ma.dtype != mb.dtype:
        return f"operands differ in dtype ({ma.dtype} vs {mb.dtype})"
    if ma.dim() != mb.dim() or any(str(x) != str(y) for x, y in zip(ma.shape, mb.shape)):
        return f"operands differ in shape ({tuple(ma.shape)} vs {tuple(mb.shape)}): a broadcast add"
    return None


def find_residual_adds(
    gm: fx.GraphModule, feature_dim: int | None = None, param_inputs: set[fx.Node] = frozenset()
) -> tuple[list[Residual], list[SkippedAdd]]:
    """All identity residuals of ``gm`` in graph order, and the adds of two tensors left alone.

    Args:
        gm: a captured ATen graph (from Dynamo, or from torch.export for ONNX).
        feature_dim: force the feature axis (1 or -1) instead of inferring it per residual.
        param_inputs: the placeholders that carry parameters.
    """
    g = ops.dataflow_graph(gm.graph)
    params = ops.parameter_nodes(gm, param_inputs)
    weighted = {n for n in gm.graph.nodes if ops.is_weighted(n, params)}
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    mutated = mutated_values(gm)
    found: list[Residual] = []
    skipped: list[SkippedAdd] = []
    for node in gm.graph.nodes:
        operands = ops.add_operands(node)
        if operands is None:
            continue
        paths = module_path(node)
        owner = paths[-1] if paths else ""

        def skip(reason: str) -> None:
            skipped.append(SkippedAdd(node.name, owner, reason))

        lhs, rhs = operands
        if lhs in params or rhs in params or ops.canonical(lhs) in params or ops.canonical(rhs) in params:
            skip("adds a parameter-derived tensor (a bias or embedding table), not a residual")
            continue
        if (why := _same_tensor_type(lhs, rhs)) is not None:
            skip(why)
            continue
        a_lhs, a_rhs = ops.canonical(lhs), ops.canonical(rhs)
        if a_lhs is not a_rhs and (branch := _between(g, nodes, order, a_lhs, rhs)):
            skip_node, branch_out = a_lhs, rhs
        elif a_lhs is not a_rhs and (branch := _between(g, nodes, order, a_rhs, lhs)):
            skip_node, branch_out = a_rhs, lhs
        else:
            skip(
                "neither operand is computed from the other (a projection shortcut, parallel "
                "branches, or an embedding/mask add): no identity path to keep"
            )
            continue
        if skip_node in mutated:
            skip("the skip input is modified in place (e.g. through a slice), so it cannot become a stream")
            continue
        branch_weights = sorted(branch & weighted, key=order.__getitem__)
        if not branch_weights:
            skip("no weights between the operands (e.g. x + g(x) inside an activation)")
            continue
        fdim = feature_dim if feature_dim is not None else _feature_dim(skip_node, branch_weights[0], params)
        channels = _channels((branch_out, skip_node), fdim)
        if not channels:
            skip(
                "the feature size is dynamic in this capture (a stream needs a fixed width C; if the wrong "
                "axis was taken as the feature axis, set MHCConfig.feature_dim)"
            )
            continue
        found.append(
            Residual(node, skip_node, branch_out, branch, owner, _child_of(owner, branch_weights), fdim, channels)
        )
    return _drop_shared_skip_nesting(found, skipped)


def _drop_shared_skip_nesting(
    found: list[Residual], skipped: list[SkippedAdd]
) -> tuple[list[Residual], list[SkippedAdd]]:
    """``x + f(x + g(x))``: an inner residual inside an outer one's branch with the *same* skip
    cannot get its own stream (both would read the one stream of x); keep the outer one."""
    keep = []
    for res in found:
        outer = next((o for o in found if o is not res and o.skip is res.skip and res.add in o.branch), None)
        if outer is None:
            keep.append(res)
        else:
            skipped.append(
                SkippedAdd(res.add.name, res.owner, f"nested inside residual {outer.name} with the same skip input")
            )
    return keep, skipped

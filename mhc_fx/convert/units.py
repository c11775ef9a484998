"""Split a converted graph by unit (block owner), so that each unit runs as a call of its module.

A captured graph is flat: the original blocks' code is inlined and their parameters are
``get_attr`` reads. Per-module machinery — FSDP2 ``fully_shard`` units, activation
checkpointing, forward hooks — needs each block to run inside a call of its module. This pass
moves the nodes of each unit (module path, e.g. ``model.layers.3``) into a region graph and
replaces them by ``call_module(unit)``; the caller makes the unit's ``forward`` run the region.

Parameters stay ``get_attr`` reads by path inside the regions, so whatever a unit's module holds
when it is called (FSDP2's gathered parameters, for instance) is what the region reads.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..errors import ConversionError


def unit_of(node: fx.Node, units: list[str], assigned: dict[fx.Node, str | None]) -> str | None:
    """The unit a node belongs to: by its module path (``call_module``/``get_attr`` target, or
    the innermost ``nn_module_stack`` entry); a ``getitem`` without one follows its input."""
    if node.op in ("call_module", "get_attr"):
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else None
        if path is None and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return assigned.get(node.args[0])
    if not isinstance(path, str):
        return None
    for unit in units:
        if path == unit or path.startswith(unit + "."):
            return unit
    return None


def _make_contiguous(graph: fx.Graph, unit: str, members: list[fx.Node], assigned: dict[fx.Node, str | None]) -> list[fx.Node]:
    """Gather a unit's ops into one run of nodes; returns the run.

    The other ops between its first and last op move before it when they do not read the
    unit's values, after it when the unit does not read theirs; ops belonging to no unit that
    do both (sizes, stream reduce/expand, dropout between two sub-blocks) join the unit.
    """
    inside = set(members)
    span, node = [], members[0]
    while node is not members[-1]:
        node = node.next
        if node not in inside and node.op != "get_attr":
            span.append(node)
    feeds: set[fx.Node] = set()
    for node in reversed(span):
        if any(user in inside or user in feeds for user in node.users):
            feeds.add(node)
    tainted, before, after = set(inside), [], []
    for node in span:
        if not any(a in tainted for a in node.all_input_nodes):
            before.append(node)
            continue
        tainted.add(node)
        if node not in feeds:
            after.append(node)
        elif assigned.get(node) not in (None, unit):
            raise ConversionError(
                f"cannot run unit '{unit}' as one module call: {node.format_node()} of unit "
                f"'{assigned[node]}' reads its values and feeds it; pass units= naming larger modules"
            )
    for node in before:
        members[0].prepend(node)
    anchor = members[-1]
    for node in after:
        anchor.append(node)
        anchor = node
    moved = set(before) | set(after)
    run, node = [], members[0]
    while True:
        if node.op != "get_attr" and node not in moved:
            run.append(node)
        if node is members[-1]:
            return run
        node = node.next


def split_units(graph: fx.Graph, units: list[str]) -> dict[str, fx.Graph]:
    """Replace each unit's nodes in ``graph`` by ``call_module(unit)``; returns unit → region.

    A region graph takes the unit's inputs (values made outside it, in order of first use) and
    returns a tuple of the values read after it; its parameter reads are its own ``get_attr``s.

    Raises:
        ConversionError: a unit's ops cannot be made contiguous, or a unit has no ops.
    """
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for node in list(graph.nodes):  # attribute reads are pure: hoisted, they never sit in a span
        if node.op == "get_attr" and node is not first:
            first.prepend(node)
    assigned: dict[fx.Node, str | None] = {}
    for node in graph.nodes:
        assigned[node] = unit_of(node, units, assigned) if node.op not in ("placeholder", "output") else None
    regions = {}
    for unit in units:
        members = [n for n in graph.nodes if assigned.get(n) == unit and n.op != "get_attr"]
        if not members:
            raise ConversionError(f"unit '{unit}' has no ops in the converted graph; pass units= naming its modules")
        regions[unit] = _extract(graph, unit, _make_contiguous(graph, unit, members, assigned))
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    return regions


def _extract(graph: fx.Graph, unit: str, members: list[fx.Node]) -> fx.Graph:
    inside = set(members)
    region = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op == "get_attr":
                env[a] = region.get_attr(a.target)
            else:
                env[a] = region.placeholder(a.name)
                env[a].meta = dict(a.meta)
                inputs.append(a)
        return env[a]

    for node in members:
        env[node] = region.node_copy(node, arg)
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    region.output(tuple(env[n] for n in outputs))
    # placeholders must come first in a graph: move them to the front, in order of creation
    first = next(n for n in region.nodes if n.op != "placeholder")
    for a in inputs:
        first.prepend(env[a])
    with graph.inserting_before(members[0]):
        call = graph.call_module(unit, tuple(inputs))
    call.meta["mhc_fx_unit"] = unit
    with graph.inserting_after(call):
        last = call
        for k, node in enumerate(outputs):
            with graph.inserting_after(last):
                item = graph.call_function(operator.getitem, (call, k))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item)
            last = item
    for node in reversed(members):
        graph.erase_node(node)
    return region

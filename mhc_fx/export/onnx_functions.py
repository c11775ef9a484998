"""Pass (on ONNX IR): fold each mHC connection's nodes into ONNX local functions.

The torch.onnx exporter records, on every node, the module scopes and classes it came from
(``pkg.torch.onnx.name_scopes`` / ``pkg.torch.onnx.class_hierarchy``). Nodes of one call of a
connection module become one call of a local function in the ``mhc_fx`` domain:

    MHCConnection → mhc_fx::MHCPre     (RMS + projection + coefficients + H_pre·X)
    HCConnection  → mhc_fx::HCPre
    DeepSeekV4Connection → mhc_fx::DeepSeekV4Pre
    Sinkhorn      → mhc_fx::Sinkhorn   (called inside MHCPre)
    PostResMix    → mhc_fx::PostRes    (H_res·X + H_postᵀ·y)

Calls with the same body share one function, so the model holds one definition per kind; the
graph stays readable and a runtime may supply its own fused kernel for a function.
"""

from __future__ import annotations

import ast
from collections import Counter

import onnx_ir as ir

DOMAIN = "mhc_fx"
FUNCTIONS = {"MHCConnection": "MHCPre", "DeepSeekV4Connection": "DeepSeekV4Pre", "HCConnection": "HCPre", "Sinkhorn": "Sinkhorn", "PostResMix": "PostRes"}
SCOPES, CLASSES = "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"


def _scope(node: ir.Node) -> tuple[tuple[str, ...], str] | None:
    """``(scope path, function name)`` of the innermost connection part holding ``node``."""
    try:
        scopes = ast.literal_eval(node.metadata_props.get(SCOPES, "[]"))
        classes = ast.literal_eval(node.metadata_props.get(CLASSES, "[]"))
    except (ValueError, SyntaxError):
        return None
    for depth in range(min(len(scopes), len(classes)) - 1, -1, -1):
        name = FUNCTIONS.get(classes[depth].rsplit(".", 1)[-1])
        if name is not None:
            return tuple(scopes[: depth + 1]), name
    return None


def _signature(nodes: list[ir.Node], inputs: list[ir.Value]) -> str:
    """A structural key: two groups with equal keys compute the same function."""
    index = {id(v): f"i{k}" for k, v in enumerate(inputs)}
    lines = []
    for k, node in enumerate(nodes):
        for j, out in enumerate(node.outputs):
            index[id(out)] = f"n{k}.{j}"
        args = ",".join(index.get(id(v), "?") if v is not None else "-" for v in node.inputs)
        attrs = ",".join(f"{a.name}={a.value!r}" for a in node.attributes.values())
        lines.append(f"{node.domain}::{node.op_type}({args})[{attrs}]")
    return "\n".join(lines)


def _clone_constant(node: ir.Node, metadata: dict[str, str]) -> ir.Node:
    return ir.Node("", "Constant", inputs=[], attributes=list(node.attributes.values()), metadata_props=metadata)


def _localize_constants(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Give every constant input of the group its own Constant node right before its reader,
    so equal computations get equal bodies (the exporter shares one Constant among readers
    and scopes). The group's original Constants leave the group (erased once unread)."""
    originals = [n for n in nodes if n.op_type == "Constant" and n.domain == ""]
    for node in [n for n in nodes if n not in originals]:
        for idx, v in enumerate(node.inputs):
            producer = v.producer() if v is not None else None
            if producer is not None and producer.op_type == "Constant" and producer.domain == "":
                copy = ir.Node("", "Constant", inputs=[], attributes=list(producer.attributes.values()),
                               metadata_props=dict(node.metadata_props))
                graph.insert_before(node, copy)
                nodes.insert(nodes.index(node), copy)
                node.replace_input_with(idx, copy.outputs[0])
    for const in originals:
        nodes.remove(const)
        if not const.outputs[0].uses() and const.outputs[0] not in graph.outputs:
            graph.remove(const, safe=False)
        else:  # still read outside the group: no longer part of any connection scope
            const.metadata_props.pop(SCOPES, None)
            const.metadata_props.pop(CLASSES, None)


def _fold(model: ir.Model, nodes: list[ir.Node], name: str, scope: tuple[str, ...], bodies: dict) -> str:
    graph = model.graph
    _localize_constants(graph, nodes)
    members = set(map(id, nodes))
    inputs, outputs = [], []
    for node in nodes:
        for v in node.inputs:
            if v is not None and (v.producer() is None or id(v.producer()) not in members) and v not in inputs:
                inputs.append(v)
        for v in node.outputs:
            outside = any(id(user) not in members for user, _ in v.uses()) or v in graph.outputs
            if outside:
                outputs.append(v)
    key = _signature(nodes, inputs)
    if key not in bodies:
        bodies[key] = name if name not in bodies.values() else f"{name}_{len(bodies)}"
        fn_name, new_function = bodies[key], True
    else:
        fn_name, new_function = bodies[key], False
    call = ir.Node(DOMAIN, fn_name, inputs=inputs, num_outputs=len(outputs), name=f"{'/'.join(scope)}/{fn_name}")
    # the call belongs to the enclosing part, if any (Sinkhorn inside MHCPre)
    classes = ast.literal_eval(nodes[0].metadata_props.get(CLASSES, "[]"))
    call.metadata_props[SCOPES] = repr(list(scope[:-1]))
    call.metadata_props[CLASSES] = repr(classes[: len(scope) - 1])
    for old, new in zip(outputs, call.outputs):
        new.name, new.type, new.shape = old.name + "_call", old.type, old.shape
        for user, idx in list(old.uses()):
            if id(user) not in members:
                user.replace_input_with(idx, new)
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
    graph.insert_before(nodes[0], call)
    graph.remove(nodes, safe=False)
    if not new_function:  # an equal body is defined already: drop these nodes' input links
        for node in nodes:
            for idx in range(len(node.inputs)):
                node.replace_input_with(idx, None)
    else:
        params = [ir.Value(name=f"x{i}", type=v.type, shape=v.shape) for i, v in enumerate(inputs)]
        for node in nodes:
            for idx, v in enumerate(node.inputs):
                if v is not None and v in inputs:
                    node.replace_input_with(idx, params[inputs.index(v)])
        body = ir.Graph(params, outputs, nodes=nodes, opset_imports=dict(graph.opset_imports), name=fn_name)
        function = ir.Function(DOMAIN, fn_name, "", graph=body, attributes=[])
        model.functions[function.identifier()] = function
    return fn_name


def fold_connection_functions(model: ir.Model) -> Counter:
    """Fold connection parts into ``mhc_fx`` local functions, innermost first; returns how
    many calls of each function the main graph (and the functions) hold."""
    calls: Counter = Counter()
    bodies: dict[str, str] = {}
    while True:
        groups: dict[tuple[tuple[str, ...], str], list[ir.Node]] = {}
        for node in model.graph:
            found = _scope(node)  # a folded call carries its enclosing part's scope
            if found is not None:
                groups.setdefault(found, []).append(node)
        if not groups:
            break
        deepest = max(len(scope) for scope, _ in groups)
        for (scope, name), nodes in groups.items():
            if len(scope) == deepest:
                calls[_fold(model, nodes, name, scope, bodies)] += 1
        model.graph.sort()
    for name, value in list(model.graph.initializers.items()):  # read only by dropped copies
        if not value.uses() and value not in model.graph.outputs:
            del model.graph.initializers[name]
    if calls:
        model.opset_imports[DOMAIN] = 1
        for function in model.functions.values():  # MHCPre calls Sinkhorn
            function.opset_imports[DOMAIN] = 1
    return calls

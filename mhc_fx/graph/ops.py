"""What an fx node computes, in the ATen graphs mhc_fx analyses.

Both captures give ATen ops (``aten.add.Tensor``, ``aten.linear.default``): Dynamo's graph traced
by ``make_fx`` (pre-dispatch), and ``torch.export`` for ONNX; Python operators appear only on
sizes (``operator.add`` of two SymInts). The passes ask the questions below and never look at
targets themselves.
"""

from __future__ import annotations

import operator
import re

import networkx as nx
import torch
import torch.fx as fx

aten = torch.ops.aten

ADD_TARGETS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd}

#: matmul/convolution family: an op of this kind with a parameter operand carries weights.
WEIGHTED_ATEN = {
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.matmul.default, aten.einsum.default, aten.conv1d.default, aten.conv2d.default,
    aten.conv3d.default, aten.convolution.default, aten.conv_transpose1d.default,
    aten.conv_transpose2d.input, aten.conv_transpose3d.input, aten._convolution.default,
}
CONV_ATEN = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten._convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
#: ops that return their input unchanged (value-wise); dropout only when inactive.
PASSTHROUGH_ATEN = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.lift_fresh_copy.default}

#: elementwise ops on one stream-carrying tensor: applying them to n streams = to each stream.
UNARY_ATEN = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.tanh.default, aten.hardswish.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.leaky_relu.default, aten.elu.default,
    aten.mish.default, aten.dropout.default, aten.to.dtype, aten._to_copy.default,
} | PASSTHROUGH_ATEN
#: binary elementwise ops whose other operand (a scalar, or a small non-stream tensor such as a
#: layer-scale γ) broadcasts over the stream axis.
BINARY_ATEN = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
NORM_ATEN = {aten.layer_norm.default, aten.rms_norm.default}


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """The graph's nodes as a networkx DAG, an edge from each input to its user."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for src in node.all_input_nodes:
            g.add_edge(src, node)
    return g


def tensor_meta(node: object) -> torch.Tensor | None:
    """The example value (FakeTensor) recorded on a node, if it is a tensor."""
    if isinstance(node, fx.Node):
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor):
            return val
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return None


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(lhs, rhs)`` if ``node`` adds two graph tensors with alpha 1, else None."""
    is_add = node.op == "call_function" and node.target in ADD_TARGETS
    if not is_add or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    lhs, rhs = node.args
    if isinstance(lhs, fx.Node) and isinstance(rhs, fx.Node):
        return lhs, rhs
    return None


def passthrough_input(node: fx.Node) -> fx.Node | None:
    """The input of a value-preserving op (alias, clone, contiguous, same-dtype ``to``,
    inactive dropout), else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if node.op == "call_function":
        if node.target in PASSTHROUGH_ATEN:
            return src
        if node.target in (aten.to.dtype, aten._to_copy.default):
            a, b = tensor_meta(node), tensor_meta(src)
            same = a is not None and b is not None and a.dtype == b.dtype and a.device == b.device
            return src if same else None
        if node.target is aten.dropout.default:
            p, train = node.args[1], node.args[2]
            return src if (not train or p == 0) else None
    return None


def canonical(node: fx.Node) -> fx.Node:
    """Follow value-preserving ops back to the node that produced the value."""
    while (src := passthrough_input(node)) is not None:
        node = src
    return node


def parameter_nodes(gm: fx.GraphModule, inputs: set[fx.Node] = frozenset()) -> set[fx.Node]:
    """Nodes whose value is a parameter (trainable or frozen: frozen weights are weights) or
    derived from parameters only (``t(weight)``, ``weight.to(dtype)``): constant propagation
    over parameters.

    Args:
        inputs: placeholders that carry parameters (Dynamo lifts parameters to graph inputs).
    """
    out: set[fx.Node] = set(inputs)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                gm.get_parameter(node.target)
            except AttributeError:
                continue
            out.add(node)
        elif node.op == "call_function" and node.all_input_nodes:
            if all(n in out for n in node.all_input_nodes):
                out.add(node)
    return out


def is_weighted(node: fx.Node, params: set[fx.Node]) -> bool:
    """Whether ``node`` applies weights to an activation (linear, conv, matmul with a parameter
    operand)."""
    if node.op != "call_function" or node.target not in WEIGHTED_ATEN:
        return False
    inputs = node.all_input_nodes
    return any(n in params for n in inputs) and any(n not in params for n in inputs)


def is_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONV_ATEN


def stream_wise_input(node: fx.Node, feature_dim: int) -> fx.Node | None:
    """If ``node`` maps its first input elementwise per stream, the input; else None.

    Such an op can be applied to an n-stream tensor (stream axis right before the feature
    axis ``feature_dim``) and acts on each stream as it acted on the single one: unary
    elementwise ops, dropout, a scalar or broadcast (layer-scale) multiply, and — for
    feature-last streams — LayerNorm/RMSNorm over the feature axis.
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    others = [n for n in node.all_input_nodes if n is not src]
    if node.op != "call_function":
        return None
    if node.target in UNARY_ATEN and not others:
        return src
    if node.target in NORM_ATEN:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return src if feature_dim == -1 and shape is not None and len(shape) == 1 else None
    if node.target in BINARY_ATEN and len(others) <= 1:
        x = tensor_meta(src)
        if not others:
            return src
        other = tensor_meta(others[0])
        trailing = 1 if feature_dim == -1 else (x.dim() - 1 if x is not None else 0)
        if node.args[1] is others[0] and other is not None and other.dim() <= trailing:
            return src
    return None


def is_view(node: fx.Node) -> bool:
    """Whether ``node``'s output aliases its first input (an ATen view such as slice, select,
    view, transpose, permute, expand, or an in-place op returning its mutated input)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def mutated_input(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place ATen op writes to (its first argument), else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    args = node.target._schema.arguments
    first = args[0] if args else None
    if first is None or first.alias_info is None or not first.alias_info.is_write:
        return None
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def alias_base(node: fx.Node) -> fx.Node:
    """Follow views back to the tensor whose storage they share."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def inplace_to_functional(node: fx.Node):
    """The out-of-place target of an in-place op on an intermediate value, else None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        name = schema.name.split("::")[-1]
        first = schema.arguments[0] if schema.arguments else None
        if not name.endswith("_") or first is None or first.alias_info is None or not first.alias_info.is_write:
            return None
        packet = getattr(aten, name[:-1], None)
        overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
        return overload
    if node.op == "call_function" and node.target is operator.iadd:
        return operator.add
    return None


def _attribute_path(source: str) -> str:
    """A Dynamo source name as a dotted module path relative to the compiled module:
    ``getattr(L['self'].blocks, '0').mlp`` → ``blocks.0.mlp``; ``L['args'][0].model`` (the module
    passed to a compiled ``__call__``) → ``model``."""
    while (unwrapped := _GETATTR.sub(r"\1.\2", source)) != source:
        source = unwrapped
    return _ROOT.sub("", source)


_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")
#: the compiled module itself, as Dynamo names it: ``L['self']``, ``L['args'][0]``, ``L__self__``
_ROOT = re.compile(r"^(L\['\w+'\](\[\d+\])?|L__self__)\.?")


def module_path(node: fx.Node, gm: fx.GraphModule | None = None) -> list[str]:
    """The module paths enclosing ``node``, outermost first (``call_module`` targets included)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [_attribute_path(p) for p, _ in stack.values() if isinstance(p, str)]
    if node.op == "call_module":
        paths.append(str(node.target))
    return [p for p in paths if p]

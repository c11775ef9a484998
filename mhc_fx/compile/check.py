"""Numbers decide: evaluate a candidate region of a graph on a few tokens of random values, and
compare its forward values and vector-Jacobian products with the fused op's reference.

The mHC ops are per token, so a region is checked on ``TokenSlice`` — its token dims (the
stream's leading dims) cut to at most :data:`FEW_TOKENS` each — whatever shape the graph was
traced at: the check's cost does not grow with the batch or the sequence, and nothing is
copied at the training shape. Parameters are drawn at their own (model-sized, small) shapes.

Gradients: a region's nodes run in the grad mode the graph gives them (``no_grad`` and
``inference_mode`` regions appear as ``_set_grad_enabled`` nodes), so a stop-gradient inside a
region shows up in its VJPs; :func:`stop_gradient` names it first, for the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..graph.ops import tensor_meta
from .nodes import shape

aten = torch.ops.aten

#: tokens per leading dim in a check (a region with more is cut to this many).
FEW_TOKENS = 3
#: forward tolerance (relative error) per dtype of the checked values.
FORWARD_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
#: VJP tolerance: fp32 rounding through 20 Sinkhorn iterations stays far below it; a stop-gradient
#: or another function is off by O(1).
GRADIENT_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
#: ops whose int-list arguments are shapes (cut with the tokens).
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.new_zeros.default, aten.new_empty.default, aten.new_ones.default, aten.new_full.default,
    aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default,
}
_STOP_GRADIENT = {aten.detach.default}


def tolerance(dtype: torch.dtype) -> float:
    return FORWARD_TOLERANCE.get(dtype, 2e-2)


@dataclasses.dataclass(frozen=True)
class TokenSlice:
    """The token dims ``lead`` of a stream ``[*lead, n, C]`` and the ``few`` a check uses:
    shapes and sizes in the region are rewritten from one to the other (see :meth:`shape`)."""

    lead: tuple[int, ...]
    few: tuple[int, ...]
    #: nodes computed from the parameters alone: they hold no token dims, so their shapes are
    #: never cut, whatever sizes they share with the tokens (``n·C == B·T``, ``[n, C] == [B, T]``)
    fixed: frozenset[fx.Node] = frozenset()

    @classmethod
    def of(cls, stream_shape: tuple[int, ...]) -> "TokenSlice":
        lead = tuple(stream_shape[:-2])
        return cls(lead, tuple(min(d, FEW_TOKENS) for d in lead))

    def fixing(self, nodes: list[fx.Node], parameters: list[fx.Node]) -> "TokenSlice":
        """This slice with :attr:`fixed` the ``parameters``, the ``get_attr`` nodes, and the
        ``nodes`` (in graph order) whose node inputs are all fixed (literal arguments aside)."""
        fixed = set(parameters)
        for node in nodes:
            if node.op == "get_attr" or (node.all_input_nodes and all(a in fixed for a in node.all_input_nodes)):
                fixed.add(node)
        return dataclasses.replace(self, fixed=frozenset(fixed))

    def shape_of(self, node: fx.Node) -> tuple[int, ...]:
        """``node``'s traced shape, cut (:meth:`shape`) unless it holds no token dims."""
        return shape(node) if node in self.fixed else self.shape(shape(node))

    @property
    def identity(self) -> bool:
        return self.lead == self.few

    def shape(self, s: tuple[int, ...] | list) -> tuple[int, ...]:
        """``s`` with its token dims cut: a leading ``lead`` (token layout ``[*lead, ...]``),
        the batch first and the spatial dims last (channel-first ``[B, ..., H, W]`` of a
        convolution net, whose stream is ``[B, H, W, n, C]`` in token layout), or the tokens
        flattened into the first dim."""
        s, k = tuple(s), len(self.lead)
        if self.identity or not s:
            return s
        if k and s[:k] == self.lead:
            return self.few + s[k:]
        if k > 1 and len(s) > k and s[0] == self.lead[0] and s[len(s) - k + 1 :] == self.lead[1:]:
            return self.few[:1] + s[1 : len(s) - k + 1] + self.few[1:]
        if k > 1 and s[0] == math.prod(self.lead):
            return (math.prod(self.few),) + s[1:]
        return s

    def size(self, hint: int) -> int:
        """A symbolic size input's value in the check (a token dim → its few)."""
        if hint in self.lead:
            return self.few[self.lead.index(hint)]
        if hint == math.prod(self.lead):
            return math.prod(self.few)
        return hint

    def args(self, node: fx.Node, args: tuple) -> tuple:
        if node.target not in _SHAPE_OPS or self.identity or node in self.fixed:
            return args
        return tuple(
            list(self.shape(a)) if isinstance(a, (list, tuple)) and a and all(isinstance(d, int) for d in a) else a
            for a in args
        )


def grad_modes(graph: fx.Graph, enabled: bool) -> dict[fx.Node, bool]:
    """Whether autograd records each node, starting from ``enabled`` (the mode the graph runs
    in) and following its ``_set_grad_enabled`` nodes."""
    modes = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            enabled = bool(node.args[0])
        modes[node] = enabled
    return modes


def stop_gradient(region: list[fx.Node], replaced: list[fx.Node], modes: dict[fx.Node, bool]) -> str | None:
    """Why the fused op would differ in backward from ``region`` because of a stop-gradient
    (a ``detach``/``.data`` inside it or on a value it replaces, or part of it under
    ``no_grad``/``inference_mode``), or None."""
    for node in region:
        if node.target in _STOP_GRADIENT:
            return f"a stop-gradient inside the region ({node.name}: detach or .data of {node.args[0].name}); the fused op has none"
    for node in replaced:
        for user in node.users:
            if user.target in _STOP_GRADIENT:
                return f"{node.name} is detached ({user.name}); the fused op would compute its gradient"
    recorded = {modes[n] for n in region if n.op == "call_function"}
    if len(recorded) > 1:
        off = next(n.name for n in region if n.op == "call_function" and not modes[n])
        return f"part of the region runs without gradients (no_grad or inference_mode at {off}); the fused op has no such part"
    return None


class Draws:
    """The random check values of one fusion pass: standard normal values shaped like a node's
    value (token dims cut by a :class:`TokenSlice`), drawn once per shape, dtype, device and
    ``seed`` — the blocks of a model share them — and handed out as copies (a graph may mutate
    its inputs). They live as long as the pass."""

    def __init__(self) -> None:
        self._drawn: dict[tuple, torch.Tensor] = {}

    def like(self, node: fx.Node, seed: int, tokens: TokenSlice | None = None) -> torch.Tensor:
        val = tensor_meta(node)
        s = tokens.shape_of(node) if tokens is not None else shape(node)
        key = (s, val.dtype, val.device, seed)
        if key not in self._drawn:
            generator = torch.Generator().manual_seed(seed)
            self._drawn[key] = torch.randn(s, generator=generator).to(device=val.device, dtype=val.dtype)
        return self._drawn[key].clone()


def probes(literals: list[float]) -> dict[float, float]:
    """A value for each small float literal of a region (its epsilons), far enough from 0 and
    from each other that where each one enters shows in the region's values: a check at these
    values proves the constants' placement, which at ``1e-6`` hides under float rounding."""
    return {value: 0.05 * (i + 1) for i, value in enumerate(sorted(set(literals)))}


def evaluate(
    gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, object], tokens: TokenSlice,
    modes: dict[fx.Node, bool] | None = None, literals: dict[float, float] | None = None,
) -> dict[fx.Node, object]:
    """Run ``nodes`` (in graph order) eagerly on the values in ``env`` with shapes cut by
    ``tokens``; with ``modes``, each node in its grad mode (else without autograd); with
    ``literals``, each float argument that is a key replaced by its value (:func:`probes`)."""
    env = dict(env)
    swap = (lambda a: literals.get(a, a) if isinstance(a, float) else a) if literals else (lambda a: a)
    for node in nodes:
        if node in env:
            continue
        if node.op == "get_attr":
            env[node] = getattr(gm, node.target)
            continue
        args = tuple(swap(a) for a in tokens.args(node, map_arg(node.args, lambda n: env[n])))
        kwargs = {k: swap(v) for k, v in map_arg(node.kwargs, lambda n: env[n]).items()}
        with torch.set_grad_enabled(bool(modes and modes.get(node, False))):
            env[node] = node.target(*args, **kwargs)
    return env


def cut_shapes_agree(nodes: list[fx.Node], env: dict[fx.Node, object], tokens: TokenSlice) -> bool:
    """Whether every evaluated tensor has the traced shape with its token dims cut: the check
    then ran the graph's function on fewer tokens, not a different function."""
    for node in nodes:
        value = env.get(node)
        if shape(node) is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tokens.shape_of(node):
            return False
    return True


def rel_err(a: object, ref: torch.Tensor) -> float:
    """``‖a − ref‖ / ‖ref‖`` in float64 (inf when ``a`` is not a tensor of ref's shape)."""
    if not isinstance(a, torch.Tensor) or tuple(a.shape) != tuple(ref.shape):
        return float("inf")
    a = a.detach().to(torch.float64).cpu()
    return float((a - ref.detach().cpu()).norm() / ref.detach().cpu().norm().clamp_min(1e-30))


def vjp_mismatch(
    gm: fx.GraphModule, nodes: list[fx.Node], inputs: dict[fx.Node, torch.Tensor],
    outputs: list[tuple[fx.Node, int]], reference: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    tokens: TokenSlice, modes: dict[fx.Node, bool], names: dict[fx.Node, str], constants: dict[fx.Node, object],
    copies: dict[fx.Node, fx.Node] | None = None,
) -> str | None:
    """Compare the region's VJPs with the reference's for one random cotangent per replaced node.

    Args:
        inputs: the region's inputs (stream and parameters) and their check values.
        outputs: ``(node, i)``: ``node`` is replaced by output ``i`` of the fused op.
        reference: the fused op's function of the inputs (in ``inputs``' order, float64).
        names: how the report names each input; constants: other values the region reads
            (symbolic sizes); copies: nodes equal to an input (``{copy: input}``), bound to the
            same leaf so gradients through either reach it.

    Returns:
        None when every input's gradient agrees (``GRADIENT_TOLERANCE``), else why not.
    """
    keys = list(inputs)
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    env = {**constants, **leaves, **{c: leaves[k] for c, k in (copies or {}).items()}}
    env = evaluate(gm, nodes, env, tokens, modes)
    generator = torch.Generator().manual_seed(len(outputs))
    cotangents = {node: torch.randn(env[node].shape, generator=generator, dtype=torch.float64) for node, _ in outputs}
    loss = sum((env[node] * cotangents[node].to(env[node].dtype)).sum() for node, _ in outputs if env[node].requires_grad)
    wanted = [leaves[k] for k in keys if leaves[k].requires_grad]
    got = torch.autograd.grad(loss, wanted, allow_unused=True) if isinstance(loss, torch.Tensor) else [None] * len(wanted)
    exact = [inputs[k].detach().to(torch.float64).cpu().requires_grad_(leaves[k].requires_grad) for k in keys]
    refs = reference(exact)
    ref_loss = sum((refs[i] * cotangents[node]).sum() for node, i in outputs)
    ref_grads = torch.autograd.grad(ref_loss, [e for e in exact if e.requires_grad], allow_unused=True)
    dtype = tensor_meta(keys[0]).dtype
    for key, g, ref in zip([k for k in keys if leaves[k].requires_grad], got, ref_grads):
        if g is None or ref is None:
            if g is None and ref is None:
                continue
            where = "the graph" if g is None else "the fused op"
            return f"{names[key]} gets no gradient in {where} but does in the other"
        err = rel_err(g, ref) if ref.any() else float(g.detach().abs().max())
        if err > GRADIENT_TOLERANCE.get(dtype, 5e-2):
            return f"the gradient of {names[key]} differs from the fused op's (relative error {err:.1e})"
    return None

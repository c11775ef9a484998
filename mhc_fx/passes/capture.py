"""Pass: capture a model as fx graphs, one per training mode.

``torch.export.export(strict=False)`` is tried first (it handles Hugging Face transformers 5.x,
timm and torch.nn models) with every example-input dim ``Dim.AUTO`` so batch and sequence stay
dynamic, then with static shapes. An exported graph bakes the training mode in (dropout,
BatchNorm), so the model is exported once in train and once in eval mode; both graphs read
the same parameters. Without example inputs, ``torch.fx.symbolic_trace`` is used; its graph
calls the original submodules and so follows ``.train()``/``.eval()`` by itself. A ready
``fx.GraphModule`` is taken as it is (a copy of it: the passes edit graphs).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ..errors import CaptureError


@dataclasses.dataclass
class Capture:
    """The captured graphs.

    Attributes:
        train, eval: the graph for each mode (the same object when it follows the mode itself).
        method: ``"torch.export"``, ``"symbolic_trace"`` or ``"graph_module"``.
        dynamic: whether input sizes other than the examples' are accepted.
        notes: earlier capture attempts that failed, and other facts the report shows.
    """

    train: fx.GraphModule
    eval: fx.GraphModule
    method: str
    dynamic: bool
    notes: list[str]


def contiguous_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with every tensor contiguous: torch.export emits a broken input guard
    for a non-contiguous example (e.g. a slice ``ids[:, :-1]``)."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))


def auto_dims(args: tuple, kwargs: dict, fn) -> dict[str, Any]:
    """``Dim.AUTO`` on every dim of every tensor input, keyed by forward's parameter names."""
    bound = inspect.signature(fn).bind(*args, **kwargs)

    def spec(value):
        return pytree.tree_map(
            lambda t: {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None, value
        )

    return {name: spec(value) for name, value in bound.arguments.items()}


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, training: bool) -> fx.GraphModule:
    was = model.training
    model.train(training)
    try:
        shapes = auto_dims(args, kwargs, model.forward) if dynamic else None
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    finally:
        model.train(was)
    return _without_input_guards(ep.module())


def _without_input_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the input-guard call export inserts (``_guards_fn``): its generated code breaks on
    re-tracing (torch.onnx, torch.export of the converted model), and without it the converted
    model, like the original, raises where its own code rejects an input."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _summary(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def capture(
    model: nn.Module, args: tuple | None, kwargs: dict | None, *, dynamic: bool = True
) -> Capture:
    """Capture ``model``; raises :class:`CaptureError` naming each failed attempt and the fix."""
    kwargs = kwargs or {}
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)  # the passes edit the graph; the caller's stays as it was
        shaped = _has_shapes(gm)
        if args is not None and not shaped:
            ShapeProp(gm).propagate(*args)
        return Capture(gm, gm, "graph_module", dynamic=not shaped, notes=[])
    notes: list[str] = []
    if args is not None or kwargs:
        args, kwargs = contiguous_inputs(tuple(args or ()), kwargs)
        for dyn in ((True, False) if dynamic else (False,)):
            try:
                train = _export(model, args, kwargs, dyn, training=True)
                evalg = _export(model, args, kwargs, dyn, training=False)
                return Capture(train, evalg, "torch.export", dynamic=dyn, notes=notes)
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the next method runs
                kind = "dynamic" if dyn else "static"
                notes.append(f"torch.export (strict=False, {kind} shapes) failed: {_summary(err)}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001
        notes.append(f"torch.fx.symbolic_trace failed: {_summary(err)}")
        hint = (
            "pass example_inputs=(...) (and example_kwargs) so torch.export can capture the model"
            if args is None and not kwargs
            else "make the failing code traceable (e.g. no data-dependent Python control flow)"
        )
        raise CaptureError(f"could not capture {type(model).__name__}: " + "; ".join(notes) + f". Fix: {hint}.") from err
    if args is not None:
        ShapeProp(gm).propagate(*args, *kwargs.values())
    notes.append("captured with torch.fx.symbolic_trace" + ("" if args is not None else " (no shapes recorded)"))
    return Capture(gm, gm, "symbolic_trace", dynamic=True, notes=notes)


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_function")

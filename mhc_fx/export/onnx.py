"""``export_onnx``: a converted model to ONNX, checked in ONNX Runtime.

eval-mode ``torch.export`` (dynamic batch/sequence/spatial sizes) → ``torch.onnx.export(...,
dynamo=True)`` → optionally the mHC parts folded into ``mhc_fx`` local functions → saved →
optionally run in ONNX Runtime on the example inputs and on inputs of another shape, and
compared with PyTorch. An error above tolerance is an exception, not a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import pathlib
import re
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..graph.capture import auto_dims, contiguous_inputs, export_graph
from ..convert import ConvertedForward, analyse, rewrite_graph
from ..errors import MHCError
from ..kernels.custom_ops import decompositions
from .runtime_sinkhorn import runtime_sinkhorns

#: relative error allowed between ONNX Runtime and PyTorch
VERIFY_TOLERANCE = 1e-4


class ExportError(MHCError, RuntimeError):
    """The model could not be exported, or ONNX Runtime disagrees with PyTorch."""


@dataclasses.dataclass
class ExportCheck:
    """One ONNX Runtime run against PyTorch: input shapes and the errors of the outputs."""

    shapes: list[tuple[int, ...]]
    max_abs: float
    max_rel: float


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` produced.

    Attributes:
        path: the ONNX file; opset: its default-domain opset; inputs: name → shape (str dims
        are dynamic); nodes: nodes of the main graph; functions: ``mhc_fx`` local function →
        number of calls; provider: the ONNX Runtime execution provider used; checks: one per
        verified input shape.
    """

    path: pathlib.Path
    opset: int
    inputs: dict[str, list[int | str]]
    nodes: int
    functions: dict[str, int]
    provider: str | None = None
    checks: list[ExportCheck] = dataclasses.field(default_factory=list)


def _has_fused_ops(ep: torch.export.ExportedProgram) -> bool:
    """Whether the program calls ``torch.ops.mhc_fx`` ops (then they must be decomposed)."""
    return any(getattr(n.target, "namespace", None) == "mhc_fx" for n in ep.graph.nodes if n.op == "call_function")


def _require(module: str, extra: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{purpose} needs the '{module}' package: pip install 'mhc_fx[{extra}]'")


def _dim(d) -> int | str:
    """An ONNX input dim: an int when static, its symbol's name when dynamic."""
    text = str(d)
    return int(text) if text.isdigit() else text


def _failing_op(err: BaseException) -> str:
    text = "".join(str(e) for e in (err, err.__cause__) if e is not None)
    found = re.search(r"OpOverload\(op='([\w.]+)'", text) or re.search(r"\b(aten\.\w+(?:\.\w+)?)", text)
    return found.group(1) if found else "unknown"


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def forward_replaced(model: nn.Module, forward: Callable | None) -> Iterator[Any]:
    """While active, ``model.forward`` is ``forward`` (a function of the call's inputs that calls
    ``type(model).forward``), or without it the class's own ``forward``: what a capture traces.
    Yields the instance ``forward`` it set aside (a converted model's guarded call, or None); any
    other instance ``forward`` (a wrapper's hook) stays in place unless ``forward`` replaces it."""
    replace = forward is not None or isinstance(model.__dict__.get("forward"), ConvertedForward)
    own = model.__dict__.pop("forward", None) if replace else None
    if forward is not None:
        model.forward = forward
    try:
        yield own
    finally:
        model.__dict__.pop("forward", None)
        if own is not None:
            model.forward = own


def exported_program(
    model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, forward: Callable | None = None, runtime_layout: bool = True
) -> torch.export.ExportedProgram:
    """``model``'s function (with ``forward`` in place of its class's, see :func:`forward_replaced`)
    as an eval-ready ``ExportedProgram`` with the reference math in place of any fused op. A
    converted model is captured by ``torch.export`` (dynamic sizes) and rewritten with its plan
    and connection modules — the same rewrite its calls get — then exported again; with
    ``runtime_layout`` its Sinkhorn projections in their runtime layout (:mod:`.runtime_sinkhorn`:
    the same function), else as the reference spells them."""
    try:
        layout = runtime_sinkhorns(model) if runtime_layout else contextlib.nullcontext()
        with forward_replaced(model, forward) as own, layout:
            traced = model
            if isinstance(own, ConvertedForward):
                traced = export_graph(model, args, kwargs, dynamic)
                analysis = analyse(traced, own.config.feature_dim)
                rewrite_graph(traced, analysis, own.plan, model, f"ONNX export of {type(model).__name__}")
            shapes = auto_dims(args, kwargs, traced.forward) if dynamic else None
            ep = torch.export.export(traced, args, kwargs, dynamic_shapes=shapes, strict=False)
        if _has_fused_ops(ep):
            ep = ep.run_decompositions(decompositions())  # fused ops → the reference math
    except Exception as err:
        raise ExportError(f"torch.export of {type(model).__name__} failed at op {_failing_op(err)}: {_first_line(err)}") from err
    return ep


def onnx_program(
    ep: torch.export.ExportedProgram, name: str, input_names: list[str], *, output_names: list[str] | None = None,
    opset: int | None = None, functions: bool = False,
):
    """``ep`` converted by ``torch.onnx.export(dynamo=True)`` (an ``ONNXProgram``), its inputs (and
    outputs) named; with ``functions`` the connections folded into ``mhc_fx`` local functions.
    Returns ``(program, {function: calls})``."""
    try:
        program = torch.onnx.export(
            ep,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            optimize=not functions,  # the optimiser merges nodes across module scopes
            verbose=False,
        )
    except Exception as err:
        raise ExportError(
            f"ONNX conversion of {name} failed at op {_failing_op(err)} (no ONNX translation for it): {_first_line(err)}"
        ) from err
    calls: Counter = Counter()
    if functions:
        from .onnx_functions import fold_connection_functions

        calls = fold_connection_functions(program.model)
    return program, calls


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    positional = list(inspect.signature(model.forward).parameters)
    names = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        top = path[1]
        if path[0].idx == 0:  # positional
            base = positional[top.idx] if top.idx < len(positional) else f"input_{top.idx}"
        else:
            base = str(top.key)
        rest = "".join(re.sub(r"\W", "_", str(k)) for k in path[2:])
        names.append(base + rest)
    return names


def _other_inputs(args: tuple, kwargs: dict, dims: dict[str, list], ranges: dict[str, tuple[int, float]], batch_only: bool):
    """The example inputs with the dynamic dims changed (doubled, within their range): all of
    them, or with ``batch_only`` just those on axis 0."""
    sizes: dict[str, int] = {}
    leaves = iter(dims.values())

    def grow(t: torch.Tensor) -> torch.Tensor:
        shape = []
        for axis, (size, dim) in enumerate(zip(t.shape, next(leaves))):
            if isinstance(dim, str) and (axis == 0 or not batch_only):
                lo, hi = ranges.get(dim, (1, float("inf")))
                new = sizes.setdefault(dim, 2 * size if 2 * size <= hi else max(lo, size - 1))
                shape.append(new)
            else:
                shape.append(size)
        if t.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool)
        if t.is_floating_point():
            return torch.randn(shape, dtype=t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, shape, dtype=t.dtype)

    return pytree.tree_map_only(torch.Tensor, grow, (args, kwargs))


def _errors(out: Any, ref: Any) -> tuple[float, float]:
    refs = [r for r in pytree.tree_leaves(ref) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if len(out) != len(refs):
        raise ExportError(f"ONNX Runtime returned {len(out)} outputs, PyTorch {len(refs)}")
    max_abs = max_rel = 0.0
    for o, r in zip(out, refs):
        o, r = torch.as_tensor(o).double(), r.detach().double()
        max_abs = max(max_abs, float((o - r).abs().max()))
        max_rel = max(max_rel, float((o - r).norm() / r.norm().clamp_min(1e-30)))
    return max_abs, max_rel


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | pathlib.Path,
    *,
    example_kwargs: dict | None = None,
    dynamic: bool = True,
    opset: int | None = None,
    verify: bool = True,
    functions: bool = False,
) -> ExportReport:
    """Export ``model`` (converted or not) to ONNX for inference.

    Args:
        model: the model; it is exported in eval mode (its mode is restored afterwards).
        example_inputs / example_kwargs: example inputs (a tensor or a tuple / a dict).
        path: the ``.onnx`` file to write; its directory must exist.
        dynamic: keep every input dim dynamic where the model allows (batch, sequence, spatial).
        opset: the default-domain opset (``None``: torch.onnx's default).
        verify: run the file in ONNX Runtime on the example inputs and (when dynamic) on inputs
            whose dynamic dims are changed, and raise :class:`ExportError` if any output differs from PyTorch
            by more than ``VERIFY_TOLERANCE`` (relative).
        functions: fold each connection into ``mhc_fx`` ONNX local functions (MHCPre/HCPre,
            Sinkhorn, PostRes) instead of inlining their nodes.

    Returns:
        An :class:`ExportReport`.
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: the directory {path.parent} does not exist")
    _require("onnxscript", "onnx", "ONNX export")
    if verify:
        _require("onnxruntime", "onnx", "verify=True (running the file in ONNX Runtime)")
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args, kwargs = contiguous_inputs(tuple(args), dict(example_kwargs or {}))
    was = model.training
    model.eval()
    try:
        # local functions keep the reference Sinkhorn (a runtime may replace the function whole)
        ep = exported_program(model, args, kwargs, dynamic, runtime_layout=not functions)
        program, calls = onnx_program(ep, type(model).__name__, _input_names(model, args, kwargs), opset=opset, functions=functions)
        program.save(str(path))
        graph = program.model.graph
        report = ExportReport(
            path=path,
            opset=program.model.opset_imports.get("", 0),
            inputs={v.name: [_dim(d) for d in v.shape] for v in graph.inputs},
            nodes=len(graph),
            functions=dict(calls),
        )
        if verify:
            ranges = {str(s): (int(r.lower), float(r.upper)) for s, r in ep.range_constraints.items()}
            _verify(model, path, args, kwargs, report, ranges)
        return report
    finally:
        model.train(was)


def _reshaped(model: nn.Module, args: tuple, kwargs: dict, report: ExportReport, ranges):
    """Inputs of another shape the model accepts (every dynamic dim changed, else the batch
    only), with the model's output on them."""
    failures = []
    for batch_only in (False, True):
        inputs = _other_inputs(args, kwargs, report.inputs, ranges, batch_only)
        try:
            with torch.no_grad():
                return inputs, model(*inputs[0], **inputs[1])
        except Exception as err:  # noqa: BLE001 - the model's own guard rejects these sizes
            failures.append(_first_line(err))
    raise ExportError(f"{type(model).__name__} accepts no input of another shape to verify with: {failures}")


def _verify(model: nn.Module, path: pathlib.Path, args: tuple, kwargs: dict, report: ExportReport, ranges) -> None:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    available = ort.get_available_providers()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about initializers it folds away
    session = ort.InferenceSession(str(path), options, providers=[provider])
    report.provider = provider
    names = [i.name for i in session.get_inputs()]
    runs = [((args, kwargs), None)]
    if any(isinstance(d, str) for dims in report.inputs.values() for d in dims):  # dynamic=True
        runs.append(_reshaped(model, args, kwargs, report, ranges))
    for inputs, ref in runs:
        leaves = _tensor_leaves(*inputs)
        if ref is None:
            with torch.no_grad():
                ref = model(*inputs[0], **inputs[1])
        out = session.run(None, {n: t.cpu().numpy() for n, t in zip(names, leaves)})
        max_abs, max_rel = _errors(out, ref)
        report.checks.append(ExportCheck([tuple(t.shape) for t in leaves], max_abs, max_rel))
        if not max_rel <= VERIFY_TOLERANCE:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch on inputs of shape {[tuple(t.shape) for t in leaves]}: "
                f"relative error {max_rel:.3g} > {VERIFY_TOLERANCE:g} (max abs {max_abs:.3g}); file kept at {path}"
            )

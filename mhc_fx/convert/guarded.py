"""The guarded call: what a converted model's ``forward`` is.

:func:`mhc_fx.convert` sets ``model.forward`` to a :class:`ConvertedForward` (an instance
attribute: the class, its ``forward`` function and every submodule stay the user's). Each call
runs the class's own ``forward`` through Dynamo (``fullgraph=True``) with a backend that
rewrites the captured graph with the plan's connection modules (:func:`rewrite_capture`) and
runs it. Dynamo's guards (dtypes, devices, sizes — 0/1 included —, non-tensor arguments,
None-ness of optional inputs, module modes, grad mode, hooks) decide when a call needs a new
capture; each new capture is checked against the plan and recorded in the report.

Under an outer ``torch.compile(model, backend=B)`` — of the model, or of a function or module
that calls it — the call is opaque to the outer trace (a frame Dynamo skips: a graph break), and
the guarded call hands its *rewritten* captures to ``B`` instead of running them eagerly
(:func:`outer_backend` reads ``B`` from Dynamo's eval-frame callback, which stays set in a
skipped frame). So ``torch.compile(model)`` compiles the converted function with Inductor,
``backend="mhc"`` fuses its mHC subgraphs (:mod:`mhc_fx.compile.backend`), and no backend ever
sees the unconverted graph.

A model with FSDP2 units (``fully_shard`` per layer) is called in the units' capture layout and
its rewritten captures run unit by unit, each region between its unit's FSDP2 hooks
(:mod:`mhc_fx.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import types
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch._dynamo.eval_frame import innermost_backend

from ..config import MHCConfig
from ..errors import CaptureError, MHCError
from ..graph.capture import (
    StateReader, describe_inputs, has_checkpointed_regions, inline_modules, parameter_placeholders, prepare_hf,
    to_aten,
)
from .context_switches import allowed_in_checkpoints, is_side_effect_in_checkpoint, side_effect_error
from .plan import Plan
from .conversion_report import ConversionReport
from .rewrite import analyse, rewrite_graph
from ..distributed import ShardedUnits, UnitsRunner, fsdp_units

#: Dynamo settings of every guarded call: hooks added after a capture are guarded (so they
#: fire), many specialisations are allowed, and running out of them raises instead of falling
#: back to the unconverted function.
DYNAMO_SETTINGS = {
    "skip_nnmodule_hook_guards": False,
    "recompile_limit": 64,
    "fail_on_recompile_limit_hit": True,
}
_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class CaptureRecord:
    """One specialisation of a converted model.

    Attributes:
        inputs: the call's inputs (``{"input_ids": "int64[1, 6]"}``); training, grad: the
        model's mode and whether gradients were enabled; backend: what runs it; reason: why it
        was captured (the first call, or what differed from the previous capture); units: the
        FSDP2 units it runs one by one (:mod:`.units`), if any.
    """

    inputs: dict[str, str]
    training: bool
    grad: bool
    backend: str
    reason: str
    units: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.inputs.items())
        mode = ("train" if self.training else "eval") + ("" if self.grad else ", no_grad")
        runs = self.backend + (f", FSDP2 units {', '.join(self.units)}" if self.units else "")
        return f"({shown}) {mode} [{runs}]: {self.reason}"


@contextlib.contextmanager
def no_fused_attention_layers() -> Iterator[None]:
    """``nn.TransformerEncoderLayer``/``MultiheadAttention`` fastpath off: in eval/no_grad it runs
    the whole layer as one fused op, which hides the residual adds from the capture."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def run_captured(compiled: Callable, model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Call ``compiled`` (a :func:`fresh_entry` under ``torch.compile``) on ``model`` with the
    settings every capture needs; Dynamo's failures become mhc_fx errors in the user's terms."""
    try:
        with torch._dynamo.config.patch(**DYNAMO_SETTINGS), no_fused_attention_layers(), allowed_in_checkpoints():
            return compiled(model, *args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        if isinstance(err.inner_exception, MHCError):
            raise err.inner_exception.with_traceback(None) from None
        raise
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as err:
        if is_side_effect_in_checkpoint(err):
            raise CaptureError(side_effect_error(type(model).__name__, err)) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"could not capture {type(model).__name__} in one graph with Dynamo ({first}); mhc_fx runs only "
            "what Dynamo captures whole. Fix: make that code traceable (no data-dependent Python control "
            "flow, no unsupported calls), or call the model with inputs and flags whose code path traces"
        ) from err


def _reason(previous: CaptureRecord | None, inputs: dict[str, str], training: bool, grad: bool, backend: str) -> str:
    """Why a capture happened: the first call, or what differs from the previous capture."""
    if previous is None:
        return "first call"
    changed = [f"{k} {previous.inputs.get(k, 'absent')} → {v}" for k, v in inputs.items() if previous.inputs.get(k) != v]
    changed += [f"{k} now absent" for k in previous.inputs if k not in inputs]
    if previous.training != training:
        changed.append("train mode" if training else "eval mode")
    if previous.grad != grad:
        changed.append("grad enabled" if grad else "no_grad")
    if previous.backend != backend:
        changed.append(f"backend {backend}")
    return "; ".join(changed) or "a guard of the previous capture failed (a module attribute, hook or global)"


def _entry(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def fresh_entry() -> Callable:
    """A function with a code object of its own: Dynamo keeps its compiled entries per code
    object, so each converted model gets a cache (and a recompile limit) of its own."""
    code = _entry.__code__.replace(co_name=f"mhc_fx_forward_{next(_ids)}")
    return types.FunctionType(code, _entry.__globals__, code.co_name)


def outer_backend(callback: Any) -> Any:
    """The backend of the ``torch.compile`` this call came through — a ``torch.compile(model)``
    wrapper, or a compiled function or module that calls the model — or None for a plain call.

    ``callback`` is Dynamo's eval-frame callback while the call runs
    (``get_eval_frame_callback()`` in :meth:`ConvertedForward.__call__`, whose frame Dynamo skips
    without clearing it): the compile's frame converter, whose innermost backend is ``B``. A
    converted model's own capture is not an outer compile."""
    if callback in (None, False):  # no compile, or Dynamo's run-only mode
        return None
    backend = innermost_backend(callback)
    return None if _is_capture_backend(backend) else backend


def _is_capture_backend(backend: Any) -> bool:
    """Whether ``backend`` is a converted model's own capture backend (:meth:`ConvertedForward._rewrite`)."""
    return isinstance(backend, functools.partial) and getattr(backend.func, "__func__", None) is ConvertedForward._rewrite


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def recomputing_eager(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Run ``gm``'s ATen ops as they are (no compiler), forward and backward split by the min-cut
    partitioner, which recomputes the activation-checkpointed regions (their ``recompute``
    tags) in backward instead of saving them: eager checkpointing in a converted model."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def nop(graph: fx.GraphModule, _inputs: list) -> Callable:
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)


def runnable(gm: fx.GraphModule, example_inputs: list, backend: Any) -> Callable:
    """What runs a rewritten capture (or one region of it): ``gm`` itself, or ``backend``'s
    compilation of it (its modules inlined, their tensors read at each call). Checkpointed
    regions need AOTAutograd's partitioner even without a backend (:func:`recomputing_eager`)."""
    if backend is None and not has_checkpointed_regions(gm):
        return gm
    flat, names = inline_modules(gm, example_inputs)
    state = StateReader(gm, names)
    compiled = (backend or recomputing_eager)(flat, [*example_inputs, *state()])
    return lambda *args: compiled(*args, *state())


def _backend_name(backend: Any) -> str:
    return getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None) or type(backend).__name__


class ConvertedForward:
    """``model.forward`` of a converted model (see the module docstring).

    Attributes:
        model: the converted model; plan: its :class:`~mhc_fx.convert.plan.Plan`; config: its
        :class:`~mhc_fx.MHCConfig`; report: its :class:`~mhc_fx.ConversionReport`
        (``report.captures`` grows per capture).
    """

    def __init__(self, model: nn.Module, plan: Plan, config: MHCConfig, report: ConversionReport) -> None:
        self.model, self.plan, self.config, self.report = model, plan, config, report
        self._compiled: list[tuple[Any, ShardedUnits | None, Callable]] = []  # (outer backend, units, entry)
        self._sharded: tuple[tuple, ShardedUnits] | None = None  # FSDP2 units: (their identity, layouts)
        self._units: ShardedUnits | None = None  # set during a call of a model with FSDP2 units
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        self.__signature__ = inspect.Signature(params)
        self.__doc__ = type(model).forward.__doc__

    def __getstate__(self) -> dict:  # pickle / deepcopy: compiled entries are rebuilt lazily
        state = dict(self.__dict__)
        state["_compiled"], state["_sharded"], state["_units"] = [], None, None
        return state

    def _compiled_for(self, backend: Any, units: ShardedUnits | None) -> Callable:
        """The compiled entry for calls through ``backend`` (None: eager) in ``units``' capture
        layout (None: no FSDP2 units): each has its own captures, so a capture made for one
        layout never runs in another."""
        for known, known_units, compiled in self._compiled:
            if known is backend and known_units is units:
                return compiled
        rewrite = functools.partial(self._rewrite, backend)
        compiled = torch.compile(fresh_entry(), backend=rewrite, fullgraph=True)
        self._compiled.append((backend, units, compiled))
        return compiled

    def _rewrite(self, backend: Any, gm: fx.GraphModule, example_inputs: list):
        """Dynamo's backend for one capture: rewrite it, then run it eagerly or hand it to the
        outer ``torch.compile``'s backend."""
        inputs = describe_inputs(gm, example_inputs, list(self.__signature__.parameters))
        mode = (self.model.training, torch.is_grad_enabled(), "eager" if backend is None else _backend_name(backend))
        previous = self.report.captures[-1] if self.report.captures else None
        units = tuple(self._units.units) if self._units is not None else ()
        record = CaptureRecord(inputs, *mode, reason=_reason(previous, inputs, *mode), units=units)
        # traced on fake tensors: the caller's saved-tensor hooks (offloading, memory probes) are for real ones
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            aten = to_aten(gm, example_inputs)
            a = analyse(aten, self.config.feature_dim, parameter_placeholders(aten, example_inputs))
            rewrite_graph(aten, a, self.plan, self.model, f"{type(self.model).__name__} called with {record}")
            self.report.captures.append(record)
            if self._units is not None:
                return UnitsRunner(aten, example_inputs, self._units, functools.partial(runnable, backend=backend))
            return runnable(aten, example_inputs, backend)

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        # Dynamo skips this frame (a graph break in an outer trace) and leaves its callback set:
        # read it here, then run everything else with Dynamo off
        return self._call(get_eval_frame_callback(), args, kwargs)

    @torch.compiler.disable
    def _call(self, callback: Any, args: tuple, kwargs: dict) -> Any:
        self.__signature__.bind(*args, **kwargs)  # the TypeError forward itself would raise
        prepare_hf(self.model, kwargs)
        backend, units = outer_backend(callback), fsdp_units(self.model)
        if not units:
            return run_captured(self._compiled_for(backend, None), self.model, args, kwargs)
        outer, self._units = self._units, self._sharded_units(units)
        try:
            with self._units.capture_layout():
                return run_captured(self._compiled_for(backend, self._units), self.model, args, kwargs)
        finally:
            self._units = outer

    def _sharded_units(self, units: dict[str, nn.Module]) -> ShardedUnits:
        """The model's :class:`ShardedUnits`, made again when its units change (their stand-ins
        stay the same objects across calls, which Dynamo's guards see)."""
        key = tuple((path, id(unit)) for path, unit in units.items())
        if self._sharded is None or self._sharded[0] != key:
            self._sharded = (key, ShardedUnits(units))
        return self._sharded[1]

    def __repr__(self) -> str:
        return f"<mhc_fx converted forward of {type(self.model).__name__}: {len(self.plan.blocks)} blocks>"

"""The guarded call: what a converted model's ``forward`` is.

:func:`mhc_fx.convert` sets ``model.forward`` to a :class:`ConvertedForward` (an instance
attribute: the class, its ``forward`` function and every submodule stay the user's). Each call
runs the class's own ``forward`` through Dynamo (``fullgraph=True``) with a backend that
rewrites the captured graph with the plan's connection modules (:func:`rewrite_capture`) and
runs it. Dynamo's guards (dtypes, devices, sizes — 0/1 included —, non-tensor arguments,
None-ness of optional inputs, module modes, grad mode, hooks) decide when a call needs a new
capture; each new capture is checked against the plan and recorded in the report.

Under an outer ``torch.compile`` the call is opaque (``torch.compiler.disable``): the outer
graph breaks around it and the converted function runs as above, whatever the outer backend;
``torch.compile(model, backend="mhc")`` makes these captures fused and Inductor-compiled
(:mod:`mhc_fx.compile.backend`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import types
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..config import MHCConfig
from ..errors import CaptureError, MHCError
from .capture import describe_inputs, parameter_placeholders, prepare_hf, to_aten
from .plan import Plan
from .report import ConversionReport
from .rewrite import analyse, rewrite_graph

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
        model's mode and whether gradients were enabled; reason: why it was captured (the first
        call, or what differed from the previous capture); backend: what runs it.
    """

    inputs: dict[str, str]
    training: bool
    grad: bool
    reason: str
    backend: str

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.inputs.items())
        mode = ("train" if self.training else "eval") + ("" if self.grad else ", no_grad")
        return f"({shown}) {mode} [{self.backend}]: {self.reason}"


def _reason(previous: CaptureRecord | None, new: CaptureRecord) -> str:
    if previous is None:
        return "first call"
    changed = [
        f"{k} {previous.inputs.get(k, 'absent')} → {v}" for k, v in new.inputs.items() if previous.inputs.get(k) != v
    ]
    changed += [f"{k} now absent" for k in previous.inputs if k not in new.inputs]
    if previous.training != new.training:
        changed.append("train mode" if new.training else "eval mode")
    if previous.grad != new.grad:
        changed.append("grad enabled" if new.grad else "no_grad")
    if previous.backend != new.backend:
        changed.append(f"backend {new.backend}")
    return "; ".join(changed) or "a guard of the previous capture failed (a module attribute, hook or global)"


def _entry(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def fresh_entry() -> Callable:
    """A function with a code object of its own: Dynamo keeps its compiled entries per code
    object, so each converted model gets a cache (and a recompile limit) of its own."""
    code = _entry.__code__.replace(co_name=f"mhc_fx_forward_{next(_ids)}")
    return types.FunctionType(code, _entry.__globals__, code.co_name)


def run_eagerly(aten: fx.GraphModule, refresh, example_inputs: list) -> Callable:
    """The default runner of a rewritten capture: its ATen graph, op by op."""
    return aten


class ConvertedForward:
    """``model.forward`` of a converted model (see the module docstring).

    Attributes:
        model: the converted model; plan: its :class:`~mhc_fx.convert.plan.Plan`; config: its
        :class:`~mhc_fx.MHCConfig`; report: its :class:`~mhc_fx.ConversionReport`
        (``report.captures`` grows per capture); runner: ``(aten_gm, refresh, example_inputs)
        → callable`` runs a rewritten capture (:func:`run_eagerly`, or the ``mhc`` backend's
        fusion and Inductor); backend_name: its name in the report.
    """

    def __init__(self, model: nn.Module, plan: Plan, config: MHCConfig, report: ConversionReport) -> None:
        self.model, self.plan, self.config, self.report = model, plan, config, report
        self.backend_name = "eager"
        self.runner: Callable = run_eagerly
        self._compiled = None
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        self.__signature__ = inspect.Signature(params)
        self.__doc__ = type(model).forward.__doc__

    def __getstate__(self) -> dict:  # pickle / deepcopy: the compiled function is rebuilt lazily
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def _backend(self, gm: fx.GraphModule, example_inputs: list):
        inputs = describe_inputs(gm, example_inputs, list(self.__signature__.parameters))
        record = CaptureRecord(inputs, self.model.training, torch.is_grad_enabled(), "", self.backend_name)
        record = dataclasses.replace(
            record, reason=_reason(self.report.captures[-1] if self.report.captures else None, record)
        )
        aten, refresh = to_aten(gm, example_inputs)
        a = analyse(aten, self.config.feature_dim, parameter_placeholders(aten, example_inputs))
        rewrite_graph(aten, a, self.plan, self.model, f"{type(self.model).__name__} called with {record}")
        self.report.captures.append(record)
        return self.runner(aten, refresh, example_inputs)

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(fresh_entry(), backend=self._backend, fullgraph=True)
        prepare_hf(self.model, kwargs)
        try:
            with torch._dynamo.config.patch(**DYNAMO_SETTINGS):
                return self._compiled(self.model, *args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            if isinstance(err.inner_exception, MHCError):
                raise err.inner_exception.with_traceback(None) from None
            raise
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CaptureError(
                f"{type(self.model).__name__}: Dynamo could not capture this call in one graph ({first}); "
                "the converted model runs only what Dynamo captures whole. Make that code traceable "
                "(no data-dependent Python control flow, no unsupported calls), or call the model with "
                "inputs and flags whose code path traces"
            ) from err

    def __repr__(self) -> str:
        return f"<mhc_fx converted forward of {type(self.model).__name__}: {len(self.plan.blocks)} blocks>"

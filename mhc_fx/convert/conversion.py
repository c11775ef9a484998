"""``convert`` and ``find_residuals``: the passes, in order, on the user's model.

plan capture (Dynamo → pre-dispatch ATen) → make in-place ops functional → find residuals →
group streams → make the plan and register one connection module per block under its owner →
install the guarded forward (:mod:`.guarded`) → check the function is preserved.

Every later capture (a call that differs in dtype, shapes, flags or mode, ONNX export) runs the
same analysis, is matched against the plan and rewritten with the same modules
(:func:`rewrite_graph`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..config import MHCConfig
from ..errors import ConfigError, ConversionError
from ..nn.connections import Connection, DeepSeekV4Connection, DeepSeekV4Head, HCConnection, MHCConnection, StreamExpand, StreamReduce
from ..graph.capture import parameter_placeholders, prepare_hf, to_aten
from .guarded import ConvertedForward, fresh_entry, run_captured
from .plan import STREAMS_MODULE, Plan, make_plan
from .conversion_report import BlockReport, ConversionReport
from .residuals import Residual
from ..distributed import FSDPModule, fsdp_units
from .rewrite import Analysis, analyse, lookup, register

#: relative error allowed between the converted and the original model at conversion time.
PRESERVE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
PRESERVE_TOLERANCE_LOW_PRECISION = 5e-2
#: the attribute of a Hugging Face config that holds the conversion (``save_pretrained`` writes it)
HF_CONFIG_KEY = "mhc_fx"
#: The attribute that holds the report of a model ``convert(method="residual")`` left unchanged
#: (its blocks, as found): what :func:`report` returns for it. A converted model's report is its
#: forward's (:attr:`ConvertedForward.report`).
UNCHANGED_REPORT = "_mhc_fx_conversion_report"


def _connection(config: MHCConfig, n_channels: int, stream_dim: int, index: int) -> Connection:
    common = dict(index=index, stream_dim=stream_dim, eps=config.eps, alpha_init=config.alpha_init)
    if config.method == "mhc" and config.form == "deepseek_v4":
        return DeepSeekV4Connection(
            config.n, n_channels, sinkhorn_iters=config.sinkhorn_iters, init=config.init, fused=config.fused_ops, **common
        )
    if config.method == "mhc":
        return MHCConnection(
            config.n, n_channels, sinkhorn_iters=config.sinkhorn_iters, init=config.init, fused=config.fused_ops,
            **common,
        )
    return HCConnection(config.n, n_channels, dynamic=config.method == "hc", **common)


def stream_dim(feature_dim: int) -> int:
    """Where the stream axis sits in the stream tensor (right before the feature axis)."""
    return -2 if feature_dim == -1 else feature_dim


def build_modules(model: nn.Module, plan: Plan, config: MHCConfig) -> list[nn.Module]:
    """Create and register the plan's connection modules and stream ends on ``model`` (fresh
    parameters at their init); returns the new modules."""
    new: list[nn.Module] = []
    ends = nn.ModuleList()
    for stream in plan.streams:
        sdim = stream_dim(stream[0].feature_dim)
        for k, block in enumerate(stream):
            conn = _connection(config, block.channels, sdim, k)
            register(model, block.connection, conn)
            new.append(conn)
        end = nn.Module()
        end.expand = StreamExpand(config.n, sdim)
        if config.reduce == "head":
            end.reduce = DeepSeekV4Head(config.n, stream[0].channels, sdim, eps=config.eps, alpha_init=config.alpha_init)
        else:
            end.reduce = StreamReduce(config.n, sdim, config.reduce)
        ends.append(end)
        new.append(end)
    register(model, STREAMS_MODULE, ends)
    return new


def _connection_path(model: nn.Module, suffix: str, taken: set[str]) -> Callable:
    def name(stream: int, index: int, res: Residual) -> str:
        base = f"{res.owner}.{res.child}_{suffix}" if res.child else f"{res.owner}.{suffix}"
        base = base.lstrip(".")
        path, i = base, 1
        while lookup(model, path) is not None or path in taken:
            i += 1
            path = f"{base}_{i}"
        taken.add(path)
        return path

    return name


def _no_residual_error(model: nn.Module, a: Analysis) -> ConversionError:
    counts = Counter(s.reason for s in a.skipped)
    reasons = "; ".join(f"{n}× {r}" for r, n in counts.items()) or "the graph has no add of two tensors"
    return ConversionError(
        f"{type(model).__name__} has no residual connection x + f(x) to convert ({reasons}). "
        "Concatenation skips (U-Net) and adds without weights on the branch are not residuals; "
        "use the model as it is."
    )


def is_converted(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), ConvertedForward)


def _check_convertible(model: nn.Module) -> None:
    if is_converted(model) or any(isinstance(m, (Connection, StreamExpand)) for m in model.modules()):
        raise ConversionError(
            f"{type(model).__name__} is already converted by mhc_fx; convert the original model instead "
            "(or load this one's weights into a fresh conversion)"
        )
    if isinstance(model, fx.GraphModule):
        raise ConversionError(
            "mhc_fx converts the model itself, in place, and captures its calls again as they change; "
            "a torch.fx GraphModule is one fixed trace: convert the module it was traced from"
        )
    if hasattr(model, STREAMS_MODULE):
        raise ConversionError(
            f"{type(model).__name__} already has an attribute {STREAMS_MODULE!r}, where mhc_fx keeps the "
            "stream ends; rename it before converting"
        )
    units = fsdp_units(model)
    if units or (FSDPModule is not None and isinstance(model, FSDPModule)):
        names = ", ".join(list(units)[:3]) + (", ..." if len(units) > 3 else "") or "the model itself"
        raise ConversionError(
            f"{type(model).__name__} is already sharded by FSDP2 (units: {names}); its connection modules would "
            "be left out of FSDP2. Fix: convert the model first, then fully_shard its layers and the model"
        )
    if "forward" in model.__dict__:
        raise ConversionError(
            f"{type(model).__name__}.forward is replaced on the instance (by another tool's wrapper or hook); "
            "mhc_fx runs the class's forward, so convert the model before wrapping it"
        )


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def capture_once(model: nn.Module, args: tuple, kwargs: dict, feature_dim: int | None) -> Analysis:
    """Capture one call of ``model`` (its current mode, no_grad) and analyse it; nothing of
    the model changes."""
    seen: dict[str, Analysis] = {}

    def backend(gm: fx.GraphModule, example_inputs: list):
        aten = to_aten(gm, example_inputs)
        seen["analysis"] = analyse(aten, feature_dim, parameter_placeholders(aten, example_inputs))
        return gm.forward

    with torch.no_grad():
        run_captured(torch.compile(fresh_entry(), backend=backend, fullgraph=True), model, args, kwargs)
    return seen["analysis"]


def block_reports(plan: Plan, modules: bool) -> list[BlockReport]:
    return [
        BlockReport(b.name, b.connection if modules else "", i, k, b.channels, b.feature_dim)
        for i, s in enumerate(plan.streams)
        for k, b in enumerate(s)
    ]


def find_residuals(
    model: nn.Module,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    config: MHCConfig | None = None,
) -> ConversionReport:
    """Capture one call of ``model`` and report its residual blocks and streams, changing nothing.

    Args:
        model: any ``nn.Module``.
        example_inputs: positional example inputs (a tensor or a tuple).
        example_kwargs: keyword example inputs (e.g. ``{"input_ids": ids}``).
        config: only ``feature_dim`` matters here.
    """
    config = config or MHCConfig()
    args, kwargs = _require_examples(model, example_inputs, example_kwargs)
    prepare_hf(model, kwargs)
    a = capture_once(model, args, kwargs, config.feature_dim)
    plan = make_plan(a.streams, a.residuals, lambda i, k, res: "")
    return ConversionReport(type(model).__name__, config.method, config.n, block_reports(plan, False), a.skipped)


def _require_examples(model: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    if not args and not kwargs:
        raise ConfigError(
            f"converting {type(model).__name__} needs example inputs: pass example_inputs=(...) and/or "
            "example_kwargs={...} with one real call's inputs (any batch and length; later calls may differ)"
        )
    return args, kwargs


def relative_error(out: Any, ref: Any) -> float:
    """The largest ``‖out−ref‖/‖ref‖`` over the floating-point leaves of two outputs."""
    outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            denom = r.double().norm().clamp_min(1e-30)
            worst = max(worst, float((o.double() - r.double()).norm() / denom))
    return worst


def _eval_no_grad(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.train(was)


def _check_preserved(model: nn.Module, ref: Any, out: Any) -> None:
    leaves = [r for r in pytree.tree_leaves(ref) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    tol = min((PRESERVE_TOLERANCE.get(r.dtype, PRESERVE_TOLERANCE_LOW_PRECISION) for r in leaves), default=1e-4)
    err = relative_error(out, ref)
    if not err <= tol:
        raise ConversionError(
            f"the converted {type(model).__name__} does not reproduce the original on the example inputs "
            f"(relative error {err:.3g} > {tol:g}); this is a bug in mhc_fx — please report it with the "
            "conversion report"
        )


def install(model: nn.Module, plan: Plan, config: MHCConfig, report: ConversionReport) -> ConvertedForward:
    """Make ``model`` (its connection modules already registered) run the plan: set its
    ``forward`` to the guarded call and record the conversion on its Hugging Face config."""
    forward = ConvertedForward(model, plan, config, report)
    model.forward = forward
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        setattr(hf_config, HF_CONFIG_KEY, {"config": dataclasses.asdict(config), "plan": plan.to_dict()})
    return forward


def uninstall(model: nn.Module, plan: Plan) -> None:
    """Undo :func:`build_modules` and :func:`install` (a conversion that failed its check)."""
    model.__dict__.pop("forward", None)
    for path in [b.connection for b in plan.blocks] + [STREAMS_MODULE]:
        *parents, name = path.split(".")
        owner = lookup(model, ".".join(parents)) if parents else model
        if isinstance(owner, nn.Module) and name in owner._modules:
            del owner._modules[name]
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, HF_CONFIG_KEY):
        delattr(hf_config, HF_CONFIG_KEY)


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    config: MHCConfig | None = None,
    **overrides: Any,
) -> nn.Module:
    """Rewrite every identity residual of ``model`` into n-stream mHC (or HC) form, in place.

    Args:
        model: any ``nn.Module`` built on residual connections.
        example_inputs / example_kwargs: one call's inputs; they make the plan (which adds are
            blocks). Later calls may differ in anything (dtype, device, sizes, flags, mode):
            each new kind of call is captured again and rewritten with the same modules.
        config: an :class:`MHCConfig`; ``overrides`` replace its fields (``n=2``).

    Returns:
        ``model`` itself: same class, same submodules, plus one connection module per block
        under the block's owner (``model.layers.0.mlp_mhc``) and ``mhc_streams``; its
        ``forward`` is the guarded call. :func:`mhc_fx.report` says what was converted.
        With ``init="preserve"`` it computes the original function (checked on the example).

    Raises:
        ConfigError: an invalid config field or no example inputs. CaptureError: Dynamo could
        not capture the call in one graph. ConversionError: no residual to convert, an already
        converted model, or a failed check.
    """
    config = dataclasses.replace(config or MHCConfig(), **overrides)
    args, kwargs = _require_examples(model, example_inputs, example_kwargs)
    _check_convertible(model)
    prepare_hf(model, kwargs)
    started = time.perf_counter()
    a = capture_once(model, args, kwargs, config.feature_dim)
    captured = time.perf_counter()
    if not a.streams:
        raise _no_residual_error(model, a)
    report = ConversionReport(type(model).__name__, config.method, config.n, [], a.skipped)
    if not config.rewrites:
        plan = make_plan(a.streams, a.residuals, lambda i, k, res: "")
        report.blocks = block_reports(plan, False)
        report.seconds = {"capture": captured - started}
        vars(model)[UNCHANGED_REPORT] = report
        return model
    suffix = "mhc" if config.method == "mhc" else "hc"
    plan = make_plan(a.streams, a.residuals, _connection_path(model, suffix, set()))
    ref = _eval_no_grad(model, args, kwargs) if config.init == "preserve" else None
    new = build_modules(model, plan, config)
    report.blocks = block_reports(plan, True)
    report.new_parameters = sum(p.numel() for m in new for p in m.parameters())
    try:
        install(model, plan, config, report)
        planned = time.perf_counter()
        if ref is not None:
            _check_preserved(model, ref, _eval_no_grad(model, args, kwargs))
    except BaseException:
        uninstall(model, plan)
        raise
    report.seconds = {"capture": captured - started, "passes": planned - captured, "check": time.perf_counter() - planned}
    return model


def report(model: nn.Module) -> ConversionReport:
    """The :class:`~mhc_fx.ConversionReport` of a converted model: its blocks, the adds left
    alone and why, and every capture of a call with the reason it happened. For a model that
    ``convert(method="residual")`` left unchanged: the blocks it found (none rewritten)."""
    if is_converted(model):
        return model.forward.report
    if UNCHANGED_REPORT in vars(model):
        return vars(model)[UNCHANGED_REPORT]
    raise ConversionError(f"{type(model).__name__} is not converted by mhc_fx (call mhc_fx.convert first)")

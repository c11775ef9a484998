"""``convert`` and ``find_residuals``: the passes run in order on a model.

capture → make in-place ops functional → find residuals → group streams → insert connection
modules → rewrite each captured graph → check the function is preserved.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .config import MHCConfig
from .converted import ConvertedModel
from .errors import ConversionError
from .nn.connections import Connection, HCConnection, MHCConnection, StreamExpand, StreamReduce
from .passes.capture import Capture, capture
from .passes.inplace import functionalize_intermediate_inplace
from .passes.residuals import SkippedAdd, find_residual_adds
from .passes.rewrite import erase_dead, rewrite_stream
from .passes.streams import Stream, group_streams
from .report import BlockReport, ConversionReport

#: relative error allowed between the converted and the original model at conversion time.
PRESERVE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
PRESERVE_TOLERANCE_LOW_PRECISION = 5e-2
STREAMS_MODULE = "mhc_streams"


@dataclasses.dataclass
class _Analysis:
    gm: fx.GraphModule
    streams: list[Stream]
    skipped: list[SkippedAdd]


def _analyse(gm: fx.GraphModule, config: MHCConfig) -> _Analysis:
    functionalize_intermediate_inplace(gm)
    residuals, skipped = find_residual_adds(gm, config.feature_dim)
    return _Analysis(gm, group_streams(gm, residuals), skipped)


def _structure(a: _Analysis) -> list[list[tuple[str, int, int]]]:
    return [[(b.name, b.channels, b.feature_dim) for b in s.blocks] for s in a.streams]


def _block_reports(streams: list[Stream], modules: list[list[str]] | None) -> list[BlockReport]:
    return [
        BlockReport(b.name, modules[i][k] if modules else "", i, k, b.channels, b.feature_dim)
        for i, s in enumerate(streams)
        for k, b in enumerate(s.blocks)
    ]


def _lookup(root: nn.Module, path: str) -> Any:
    try:
        return functools.reduce(getattr, path.split("."), root)
    except AttributeError:
        return None


def _free_path(tree: nn.Module, path: str) -> str:
    """``path`` or ``path_2``, ``path_3``... — the first name not taken in ``tree``."""
    candidate, i = path, 1
    while _lookup(tree, candidate) is not None:
        i += 1
        candidate = f"{path}_{i}"
    return candidate


def _register(tree: nn.Module, path: str, module: nn.Module) -> str:
    """Add ``module`` at ``path`` (creating empty containers as needed); returns the path."""
    path = _free_path(tree, path)
    *parents, name = path.split(".")
    owner = tree
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(name, module)
    return path


def _connection(config: MHCConfig, stream: Stream, index: int) -> Connection:
    block = stream.blocks[index]
    common = dict(index=index, stream_dim=stream.stream_dim, eps=config.eps, alpha_init=config.alpha_init)
    if config.method == "mhc":
        return MHCConnection(
            config.n, block.channels, sinkhorn_iters=config.sinkhorn_iters, init=config.init, fused=config.fused_ops,
            **common,
        )
    return HCConnection(config.n, block.channels, dynamic=config.method == "hc", **common)


def _insert_modules(tree: nn.Module, streams: list[Stream], config: MHCConfig) -> tuple[list[list[str]], list[nn.Module]]:
    """Register one connection per block (named after its owner) and the stream ends."""
    suffix = "mhc" if config.method == "mhc" else "hc"
    paths, new = [], []
    ends = nn.ModuleList()
    for stream in streams:
        names = []
        for k, block in enumerate(stream.blocks):
            conn = _connection(config, stream, k)
            base = f"{block.owner}.{block.child}_{suffix}" if block.child else f"{block.owner}.{suffix}"
            names.append(_register(tree, base.lstrip("."), conn))
            new.append(conn)
        paths.append(names)
        end = nn.Module()
        end.expand = StreamExpand(config.n, stream.stream_dim)
        end.reduce = StreamReduce(config.n, stream.stream_dim, config.reduce)
        ends.append(end)
        new.append(end)
    _register(tree, STREAMS_MODULE, ends)
    return paths, new


def _rewrite(a: _Analysis, paths: list[list[str]]) -> None:
    dead, replaced = [], {}
    for i, (stream, names) in enumerate(zip(a.streams, paths)):  # streams are in graph order
        ends = f"{STREAMS_MODULE}.{i}"
        dead += rewrite_stream(a.gm, stream, names, f"{ends}.expand", f"{ends}.reduce", replaced)
    erase_dead(a.gm, dead)


def _adopt_attributes(tree: nn.Module, gm: fx.GraphModule) -> None:
    """Make everything ``gm``'s graph reads live in ``tree``, the one namespace both graphs of
    a :class:`ConvertedModel` share: tensor constants that export lifted onto the graph module
    as plain attributes become non-persistent buffers, and what only the eval graph has (its
    constants, the subgraphs of higher-order ops such as autocast regions) joins under a fresh
    name."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _lookup(gm, node.target)
        *parents, name = node.target.split(".")
        owner = _lookup(tree, ".".join(parents)) if parents else tree
        if isinstance(owner, nn.Module) and any(
            getattr(owner, d).get(name) is value for d in ("_parameters", "_buffers", "_modules")
        ):
            continue
        if isinstance(value, nn.Module):
            node.target = _register(tree, f"{node.target}_eval", value)
        elif _lookup(tree, node.target) is value:
            delattr(owner, name)  # a plain attribute of the tree itself
            owner.register_buffer(name, value, persistent=False)
        else:
            path = _free_path(tree, f"{node.target}_eval")
            *parents, name = path.split(".")
            (_lookup(tree, ".".join(parents)) if parents else tree).register_buffer(name, value, persistent=False)
            node.target = path


def _no_residual_error(model: nn.Module, a: _Analysis) -> ConversionError:
    counts = Counter(s.reason for s in a.skipped)
    reasons = "; ".join(f"{n}× {r}" for r, n in counts.items()) or "the graph has no add of two tensors"
    return ConversionError(
        f"{type(model).__name__} has no residual connection x + f(x) to convert ({reasons}). "
        "Concatenation skips (U-Net) and adds without trainable weights on the branch are not residuals; "
        "use the model as it is."
    )


def _check_not_converted(model: nn.Module) -> None:
    if isinstance(model, ConvertedModel) or any(isinstance(m, (Connection, StreamExpand)) for m in model.modules()):
        raise ConversionError(
            f"{type(model).__name__} is already converted by mhc_fx; convert the original model instead "
            "(or load this one's state_dict into a fresh conversion)"
        )


def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _report(model, config, cap: Capture, a: _Analysis, paths, new_params: int) -> ConversionReport:
    return ConversionReport(
        model=type(model).__name__,
        method=config.method,
        n=config.n,
        capture=cap.method,
        dynamic=cap.dynamic,
        blocks=_block_reports(a.streams, paths),
        skipped=a.skipped,
        notes=list(cap.notes),
        new_parameters=new_params,
    )


def find_residuals(
    model: nn.Module,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    config: MHCConfig | None = None,
) -> ConversionReport:
    """Capture ``model`` and report its residual blocks and streams, changing nothing.

    Args:
        model: any ``nn.Module`` (or a ready ``fx.GraphModule``).
        example_inputs: positional example inputs (a tensor or a tuple); ``None`` falls back to
            ``torch.fx.symbolic_trace``.
        example_kwargs: keyword example inputs (e.g. ``{"input_ids": ids}``).
        config: only ``feature_dim`` and ``dynamic`` matter here.
    """
    config = config or MHCConfig()
    cap = capture(model, _as_args(example_inputs), example_kwargs, dynamic=config.dynamic)
    a = _analyse(cap.train, config)
    return _report(model, config, cap, a, None, 0)


def _relative_error(out: Any, ref: Any) -> float:
    outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            denom = r.double().norm().clamp_min(1e-30)
            worst = max(worst, float((o.double() - r.double()).norm() / denom))
    return worst


def _check_preserved(converted: ConvertedModel, model: nn.Module, args: tuple, kwargs: dict) -> None:
    was = model.training
    model.eval()
    converted.eval()
    try:
        with torch.no_grad():
            ref = model(*args, **kwargs)
            out = converted(*args, **kwargs)
    finally:
        model.train(was)
        converted.train(was)
    leaves = [r for r in pytree.tree_leaves(ref) if isinstance(r, torch.Tensor) and r.is_floating_point()]
    tol = min((PRESERVE_TOLERANCE.get(r.dtype, PRESERVE_TOLERANCE_LOW_PRECISION) for r in leaves), default=1e-4)
    err = _relative_error(out, ref)
    if not err <= tol:
        raise ConversionError(
            f"the converted {type(model).__name__} does not reproduce the original on the example inputs "
            f"(relative error {err:.3g} > {tol:g}); this is a bug in mhc_fx — please report it with the "
            "conversion report"
        )


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    config: MHCConfig | None = None,
    **overrides: Any,
) -> ConvertedModel:
    """Rewrite every identity residual of ``model`` into n-stream mHC (or HC) form.

    Args:
        model: any ``nn.Module`` built on residual connections, or a ready ``fx.GraphModule``.
        example_inputs / example_kwargs: example inputs for ``torch.export`` (batch and
            sequence sizes stay dynamic). Without them, ``torch.fx.symbolic_trace`` is tried.
        config: an :class:`MHCConfig`; ``overrides`` replace its fields (``n=2``).

    Returns:
        A :class:`ConvertedModel` (its ``.report`` says what was converted). With
        ``init="preserve"`` it computes the original function at conversion time; this is
        checked on the example inputs.

    Raises:
        ConfigError: an invalid config field. CaptureError: no capture method worked.
        ConversionError: no residual to convert, an already converted model, or a failed check.
    """
    config = dataclasses.replace(config or MHCConfig(), **overrides)
    _check_not_converted(model)
    args = _as_args(example_inputs)
    kwargs = example_kwargs or {}
    src = model if config.inplace else copy.deepcopy(model)
    started = time.perf_counter()
    cap = capture(src, args, kwargs, dynamic=config.dynamic)
    captured = time.perf_counter()
    train = _analyse(cap.train, config)
    evaluation = train if cap.eval is cap.train else _analyse(cap.eval, config)
    if not train.streams:
        raise _no_residual_error(model, train)
    if _structure(train) != _structure(evaluation):
        raise ConversionError(
            f"{type(model).__name__}'s train-mode and eval-mode graphs have different residual structure "
            f"({_structure(train)} vs {_structure(evaluation)}); convert a model whose blocks do not depend on the mode"
        )
    tree = cap.train
    _adopt_attributes(tree, cap.train)
    if cap.eval is not cap.train:
        _adopt_attributes(tree, cap.eval)
        cap.eval.graph.owning_module = tree  # both graphs resolve names in one tree
    paths, new_modules = [], []
    if config.rewrites:
        paths, new_modules = _insert_modules(tree, train.streams, config)
        _rewrite(train, paths)
        if evaluation is not train:
            _rewrite(evaluation, paths)
    new_params = sum(p.numel() for m in new_modules for p in m.parameters())
    report = _report(model, config, cap, train, paths or None, new_params)
    converted = ConvertedModel(tree, cap.train.graph, cap.eval.graph, report)
    converted.train(model.training)
    passed = time.perf_counter()
    if config.init == "preserve" and (args is not None or kwargs):
        _check_preserved(converted, src, args or (), kwargs)
    report.seconds = {"capture": captured - started, "passes": passed - captured, "check": time.perf_counter() - passed}
    return converted

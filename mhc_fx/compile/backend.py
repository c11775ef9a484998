"""``torch.compile(model, backend="mhc")``: fuse the mHC subgraphs, then Inductor.

For each graph Dynamo captures, the backend

1. traces it to pre-dispatch ATen (``make_fx``): Python spellings normalised, autograd not yet
   applied;
2. runs :func:`mhc_fx.compile.fuse.fuse_mhc`: every mHC pre side (RMS norm + projection,
   coefficients + Sinkhorn, ``H_pre·X``), every mixing ``H_res·X + H_postᵀ·y`` and adjacent
   (post_res, pre) pairs found *by what they compute* become ``torch.ops.mhc_fx`` ops;
3. hands the graph to Inductor (``compile_fx``). AOTAutograd builds the joint forward/backward
   graph from it, in which the fused ops' registered backwards appear; with
   ``recompute=True``, :class:`mhc_fx.compile.recompute.SelectiveRecompute` plans there which
   stream tensors are recomputed instead of saved.

Options, by ``torch.compile(m, backend="mhc", options={...})`` or
``torch.compile(m, backend=mhc_fx.backend.options(...))``: see :class:`BackendOptions`.
What was fused: :func:`reports` (one :class:`~mhc_fx.compile.fuse.FusionReport` per compiled
graph) and the ``mhc_fx.backend`` logger (INFO).

The name ``"mhc"`` comes from the ``torch_dynamo_backends`` entry point in ``pyproject.toml``
(Dynamo loads this module the first time the name is used); pass :func:`mhc` or
:func:`options` itself where the package is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from ..convert.capture import to_aten
from ..errors import ConfigError
from ..kernels import runtime  # importing mhc_fx.kernels registers torch.ops.mhc_fx
from .fuse import fuse_mhc
from .report import FusionReport
from .recompute import SelectiveRecompute

log = logging.getLogger(__name__)
_REPORTS: list[FusionReport] = []


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of the ``mhc`` backend.

    Attributes:
        cross_layer: merge the mixing of block l with the pre side of block l+1 into one
            ``post_res_pre`` op where the graph allows (saves one read of the stream).
        recompute: selective recomputation (mHC §4.3.2): keep the stream every
            ``recompute_every`` blocks and each branch output; recompute the rest in backward.
        recompute_every: ``L_r``; ``None`` picks ``round(√(nL/(n+2)))``.
        inductor: Inductor config patches (``torch.compile(options=...)`` of the default
            backend), passed through.
        compile_cpu_ops: where the fused ops run without Triton (CPU tensors, no
            interpreter), run their reference compiled by Inductor once per op and shape
            (:func:`mhc_fx.kernels.runtime.compile_cpu_path`, process-wide) rather than eagerly.
    """

    cross_layer: bool = True
    recompute: bool = False
    recompute_every: int | None = None
    inductor: dict = dataclasses.field(default_factory=dict)
    compile_cpu_ops: bool = True

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        """Options from a ``torch.compile(options=...)`` dict; unknown keys raise ConfigError."""
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"backend 'mhc': unknown option(s) {unknown}; valid: {sorted(names)} "
                "(Inductor settings go under 'inductor': {...})"
            )
        every = options.get("recompute_every")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigError(f"backend 'mhc': recompute_every must be an int ≥ 1 (blocks per saved stream), got {every!r}")
        return cls(**options)


def reports() -> list[FusionReport]:
    """The fusion report of every graph the backend compiled, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget the reports :func:`reports` returns."""
    _REPORTS.clear()


def mhc(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """The ``mhc`` backend (see the module docstring)."""
    opts = BackendOptions.parse(options)
    aten_gm, refresh = to_aten(gm, example_inputs)
    report = fuse_mhc(aten_gm, refresh, cross_layer=opts.cross_layer)
    if report.fused or report.existing:
        runtime.compile_cpu_path(opts.compile_cpu_ops)
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor)
    if opts.recompute:
        def on_plan(plan: str) -> None:
            report.recompute = plan
            log.info("mhc recompute: %s", plan)

        patches["joint_custom_post_pass"] = SelectiveRecompute(opts.recompute_every, on_plan)
    _REPORTS.append(report)
    log.info("%s", report)
    return compile_fx(aten_gm, example_inputs, config_patches=patches)


def options(**kwargs) -> Callable:
    """The ``mhc`` backend with :class:`BackendOptions` bound:
    ``torch.compile(m, backend=mhc_fx.backend.options(recompute=True))``."""
    BackendOptions.parse(kwargs)
    return functools.partial(mhc, options=kwargs)


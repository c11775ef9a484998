"""``torch.compile(model, backend="mhc")``: fuse the mHC subgraphs, then Inductor.

For each graph Dynamo captures, the backend

1. traces it to pre-dispatch ATen (``make_fx``): Python spellings normalised, autograd not yet
   applied;
2. runs :func:`mhc_fx.compile.fuse.fuse_mhc`: every mHC pre side (RMS norm + projection,
   coefficients + Sinkhorn, ``H_pre·X``), every mixing ``H_res·X + H_postᵀ·y`` and adjacent
   (post_res, pre) pairs found *by what they compute* — checked on a few tokens in forward and
   backward (VJPs; stop-gradients reject) — become ``torch.ops.mhc_fx`` ops, pinned to a path;
3. hands the graph to Inductor (``compile_fx``). AOTAutograd builds the joint forward/backward
   graph from it, in which the fused ops' registered backwards appear; with
   ``recompute=True``, :class:`mhc_fx.compile.recompute.SelectiveRecompute` plans there which
   stream tensors are recomputed instead of saved. With ``cpu_ops_in_graph=True``, ops pinned
   to the compiled CPU path are decomposed there into that path's ATen ops (the Sinkhorn kept
   as ops compiled once), which Inductor fuses with the model's own.

Options, by ``torch.compile(m, backend="mhc", options={...})`` or
``torch.compile(m, backend=mhc_fx.compile.backend.options(...))``: see :class:`BackendOptions`.
What was fused belongs to the compiled model: :func:`mhc_fx.fusion_reports(model)
<mhc_fx.compile.fusion_report.fusion_reports>` (one :class:`~mhc_fx.compile.fusion_report.FusionReport`
per graph compiled for it, filed on the modules whose code the graph computes:
:func:`traced_modules`); a backend made by :func:`options` also keeps the reports of every graph
it compiled (``.reports``, for compiled functions); and the ``mhc_fx.compile.backend`` logger (INFO).

The name ``"mhc"`` comes from the ``torch_dynamo_backends`` entry point in ``pyproject.toml``
(Dynamo loads this module the first time the name is used); pass :func:`mhc` or
:func:`options` itself where the package is not installed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
import torch.fx as fx
from torch import nn
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.decomposition import select_decomp_table

from ..graph.capture import to_aten
from ..errors import ConfigError
from ..kernels import custom_ops
from .fuse import fuse_mhc
from .fusion_report import FusionReport, file_under
from .recompute import SelectiveRecompute

log = logging.getLogger(__name__)


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
        compile_cpu_ops: where the fused ops of this compile run without Triton (CPU tensors,
            no interpreter), compile their pure-torch path with Inductor (path
            ``compiled_reference``: each op's function compiled once per shape, shared by all
            blocks) rather than run it eagerly (``reference``). Pinned in the
            graph: it applies to this compile only, forward and backward.
        cpu_ops_in_graph: with ``compile_cpu_ops``, trace the ops' CPU path into the model's
            forward and backward graphs (the Sinkhorn iterations as ops compiled once per
            shape) instead of calling each op's own compiled function: Inductor fuses the
            connections' math with the model's (12-layer GPT on 2 CPU cores: step −3 to −6 %,
            first step +15–19 s). Not with ``recompute``, whose plan tags the ops themselves.
    """

    cross_layer: bool = True
    recompute: bool = False
    recompute_every: int | None = None
    inductor: dict = dataclasses.field(default_factory=dict)
    compile_cpu_ops: bool = True
    cpu_ops_in_graph: bool = False

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
        parsed = cls(**options)
        if parsed.cpu_ops_in_graph and (parsed.recompute or not parsed.compile_cpu_ops):
            raise ConfigError(
                "backend 'mhc': cpu_ops_in_graph traces the compiled CPU path (compile_cpu_ops=True) into the "
                "graph, without recompute (its plan tags the ops themselves); drop cpu_ops_in_graph or "
                f"set compile_cpu_ops=True, recompute=False (got compile_cpu_ops={parsed.compile_cpu_ops}, "
                f"recompute={parsed.recompute})"
            )
        return parsed


class CpuOpsInGraph(CustomGraphPass):
    """Inductor ``joint_custom_pre_pass`` of ``cpu_ops_in_graph``: checks that every fused op
    pinned to the compiled CPU path was traced into the joint graph (none is left as an op),
    and keys Inductor's and AOTAutograd's caches apart from compiles that keep the ops (a
    decomposition table is not part of their keys; this pass's uuid is)."""

    def __call__(self, graph: fx.Graph) -> None:
        left = [node.name for node in graph.nodes
                if getattr(node.target, "namespace", None) == "mhc_fx" and "compiled_reference" in node.args]
        if left:
            raise RuntimeError(f"mhc backend: cpu_ops_in_graph left fused ops {left} in the joint graph")

    def uuid(self) -> str:
        return "mhc_fx.cpu_ops_in_graph.v1"


def traced_modules(gm: fx.GraphModule, example_inputs: list) -> list[nn.Module]:
    """The modules whose code ``gm`` computes, from Dynamo's own record of the frame it traced
    (the instruction translator's locals): the frame's ``self``, and any other module in a local
    whose parameters or buffers the graph reads (a forward resumed after a graph break may no
    longer hold ``self``, only the block it calls next). For a converted model's capture this is
    the model. Empty outside a Dynamo compile, and for a frame of tensors only."""
    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:  # Dynamo is not compiling a frame
        return []
    read = {id(t) for t in (*example_inputs, *gm.parameters(), *gm.buffers()) if isinstance(t, torch.Tensor)}
    modules = {
        id(value): value for name, value in tx.f_locals.items()
        if isinstance(value, nn.Module)
        and (name == "self" or any(id(t) in read for t in itertools.chain(value.parameters(), value.buffers())))
    }
    return list(modules.values())


class MHCBackend:
    """The ``mhc`` backend with its options bound (see the module docstring). ``reports``:
    the fusion report of every graph this backend object compiled, oldest first."""

    def __init__(self, options: dict | None = None, mode: str | None = None) -> None:
        self.options = BackendOptions.parse(options)
        self.mode = mode
        self.reports: list[FusionReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        opts = self.options
        aten_gm = to_aten(gm, example_inputs)
        cpu = "compiled_reference" if opts.compile_cpu_ops else "reference"
        report = fuse_mhc(aten_gm, cross_layer=opts.cross_layer, cpu_path=cpu)
        patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
        patches.update(opts.inductor)
        if opts.recompute:
            def on_plan(plan: str) -> None:
                report.recompute = plan
                log.info("mhc recompute: %s", plan)

            patches["joint_custom_post_pass"] = SelectiveRecompute(opts.recompute_every, on_plan)
        self.reports.append(report)
        file_under(traced_modules(gm, example_inputs), report)
        log.info("%s", report)
        decompositions = None
        if opts.cpu_ops_in_graph:
            decompositions = {**select_decomp_table(), **custom_ops.traced_cpu_decompositions()}
            patches["joint_custom_pre_pass"] = CpuOpsInGraph()
        return compile_fx(aten_gm, example_inputs, config_patches=patches, decompositions=decompositions)

    def __repr__(self) -> str:
        return f"MHCBackend({self.options})"


def mhc(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """The ``mhc`` backend as ``torch.compile(backend="mhc", options=..., mode=...)`` calls it."""
    return MHCBackend(options, mode)(gm, example_inputs)


def options(**kwargs) -> MHCBackend:
    """The ``mhc`` backend with :class:`BackendOptions` bound:
    ``torch.compile(m, backend=mhc_fx.compile.backend.options(recompute=True))``."""
    return MHCBackend(kwargs)

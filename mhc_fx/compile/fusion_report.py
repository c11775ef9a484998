"""What the fusion pass did to one graph (:class:`FusionReport`), and the reports of each
compiled model (:func:`fusion_reports`).

A report belongs to the modules whose code its graph computes (found by
:func:`mhc_fx.compile.backend.traced_modules`): the backend files it on each of them
(:func:`file_under`), as an attribute of the module. Copies of a module (``copy.deepcopy``,
pickling) start without reports: a copy has compiled nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule


@dataclasses.dataclass(frozen=True)
class Fused:
    """One fused op: ``kind`` (``pre``, ``post_res``, ``post_res_pre``), the module it came
    from (``nn_module_stack`` of the matched nodes) and the form of mHC its pre side computes
    (:attr:`mhc_fx.nn.functional.Form.name`)."""

    kind: str
    owner: str
    form: str = "paper"


@dataclasses.dataclass(frozen=True)
class Unfused:
    """A candidate left as it was: where it is and why."""

    kind: str
    owner: str
    reason: str


@dataclasses.dataclass
class FusionReport:
    """What the fusion pass did to one graph.

    Attributes:
        fused: each fused op, in graph order; unfused: candidates left alone, with the reason;
        existing: fused ops the graph already called (a model converted with
        ``fused_ops=True``); recompute: the recomputation plan, if one was applied (see
        :mod:`mhc_fx.compile.recompute`); seconds: time the fusion pass took.
    """

    fused: list[Fused] = dataclasses.field(default_factory=list)
    unfused: list[Unfused] = dataclasses.field(default_factory=list)
    existing: Counter = dataclasses.field(default_factory=Counter)
    recompute: str | None = None
    seconds: float = 0.0
    #: when it was made, relative to the process's other reports (orders :func:`fusion_reports`)
    made: int = dataclasses.field(default_factory=itertools.count().__next__, compare=False, repr=False)

    @property
    def counts(self) -> Counter:
        """Fused ops per kind (``pre``, ``post_res``, ``post_res_pre``)."""
        return Counter(f.kind for f in self.fused)

    @property
    def num_pre(self) -> int:
        """Blocks whose pre side runs fused (``pre`` + ``post_res_pre``)."""
        c = self.counts
        return c["pre"] + c["post_res_pre"]

    @property
    def num_post_res(self) -> int:
        """Blocks whose mixing runs fused (``post_res`` + ``post_res_pre``)."""
        c = self.counts
        return c["post_res"] + c["post_res_pre"]

    def __str__(self) -> str:
        c = self.counts
        lines = [
            f"mhc fusion: {c['pre']} pre, {c['post_res']} post_res, {c['post_res_pre']} post_res_pre "
            f"(blocks with fused pre {self.num_pre}, fused mixing {self.num_post_res})"
        ]
        forms = Counter(f.form for f in self.fused if f.kind != "post_res")
        if set(forms) - {"paper"}:
            lines.append("  forms: " + ", ".join(f"{k} ×{v}" for k, v in sorted(forms.items())))
        if self.existing:
            lines.append("  already fused in the model: " + ", ".join(f"{k} ×{v}" for k, v in sorted(self.existing.items())))
        lines += [f"  not fused: {u.kind} at {u.owner or '?'}: {u.reason}" for u in self.unfused]
        if not (self.fused or self.unfused or self.existing):
            lines.append("  no Sinkhorn chain in this graph, so no mHC layer to fuse (HC and plain residuals have none)")
        if self.recompute:
            lines.append(f"  recompute: {self.recompute}")
        return "\n".join(lines)


#: the attribute of a module that holds the reports filed on it
ATTRIBUTE = "_mhc_fx_fusion_reports"


class _Filed(list):
    """The reports filed on one module; a copy of the module starts without any."""

    def __deepcopy__(self, memo: dict) -> "_Filed":
        return _Filed()

    def __reduce__(self) -> tuple:
        return _Filed, ()


def file_under(modules: list[nn.Module], report: FusionReport) -> None:
    """File ``report`` on each of ``modules`` (the backend calls this for every graph it compiles)."""
    for module in modules:
        vars(module).setdefault(ATTRIBUTE, _Filed()).append(report)


def fusion_reports(model: nn.Module) -> list[FusionReport]:
    """The fusion report of every graph the ``mhc`` backend compiled for ``model`` (the module,
    or its ``torch.compile`` wrapper) or one of its submodules, oldest first; empty if none was.
    A recompile (new shapes, another mode) adds one."""
    if isinstance(model, OptimizedModule):
        model = model._orig_mod
    filed = {id(r): r for module in model.modules() for r in vars(module).get(ATTRIBUTE, ())}
    return sorted(filed.values(), key=lambda r: r.made)

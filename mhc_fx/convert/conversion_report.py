"""``ConversionReport``: what a conversion found and did, printable as tables (rich)."""

from __future__ import annotations

import dataclasses
import io
from collections import Counter

from rich.console import Console, Group
from rich.table import Table

from .residuals import SkippedAdd


@dataclasses.dataclass(frozen=True)
class BlockReport:
    """One converted residual block.

    Attributes:
        name: readable block name (owner module + branch submodule, e.g. ``layers.3.mlp``);
        module: path of its connection module (``""`` when nothing was inserted);
        stream: index of its stream; index: position in the stream; channels: C;
        feature_dim: the stream's feature axis (-1 feature-last, 1 channel-first).
    """

    name: str
    module: str
    stream: int
    index: int
    channels: int
    feature_dim: int


@dataclasses.dataclass
class ConversionReport:
    """What :func:`mhc_fx.convert` / :func:`mhc_fx.find_residuals` saw and did.

    Attributes:
        model: class name of the model; method, n: the config's; blocks: converted (or, for
        find_residuals, convertible) blocks; skipped: adds of two tensors left alone, with the
        reason; notes: other facts; new_parameters: number of parameters the conversion added;
        seconds: wall time of each phase (``capture``, ``passes``, ``check``); captures: every
        specialisation the converted model captured since (its inputs, mode, and why —
        :class:`~mhc_fx.convert.guarded.CaptureRecord`).
    """

    model: str
    method: str
    n: int
    blocks: list[BlockReport]
    skipped: list[SkippedAdd]
    notes: list[str] = dataclasses.field(default_factory=list)
    new_parameters: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    captures: list = dataclasses.field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_streams(self) -> int:
        return len({b.stream for b in self.blocks})

    def skipped_reasons(self) -> Counter:
        """How many adds were left alone for each reason."""
        return Counter(s.reason for s in self.skipped)

    def __rich__(self) -> Group:
        title = (
            f"{self.model}: {self.num_blocks} residual blocks in {self.num_streams} streams → "
            f"{self.method} (n={self.n}); +{self.new_parameters:,} parameters"
        )
        blocks = Table(title=title, title_justify="left")
        for col in ("stream", "#", "block", "connection module", "C", "layout"):
            blocks.add_column(col)
        for b in self.blocks:
            layout = "[..., n, C]" if b.feature_dim == -1 else "[B, n, C, ...]"
            blocks.add_row(str(b.stream), str(b.index), b.name, b.module or "-", str(b.channels), layout)
        parts: list = [blocks]
        if self.skipped:
            skipped = Table(title=f"{len(self.skipped)} adds left alone", title_justify="left")
            for col in ("count", "reason", "e.g. (node @ owner)"):
                skipped.add_column(col)
            for reason, count in self.skipped_reasons().most_common():
                first = next(s for s in self.skipped if s.reason == reason)
                skipped.add_row(str(count), reason, f"{first.node} @ {first.owner or '<root>'}")
            parts.append(skipped)
        parts += [f"note: {note}" for note in self.notes]
        parts += [f"capture {i}: {c}" for i, c in enumerate(self.captures)]
        return Group(*parts)

    def __str__(self) -> str:
        buf = io.StringIO()
        Console(file=buf, width=130, color_system=None).print(self)
        return buf.getvalue()

"""The conversion's plan: which residual blocks exist, how they chain into streams, and which
connection module each one uses — made once at ``convert``, matched by every later capture.

A block is identified by its *owner* (the module path of the add, e.g. ``model.layers.3``) and
its *position* among the owner's residual adds in graph order (a transformer layer has two).
Every capture of a call (other dtype, shapes, flags, mode) is analysed again; its blocks must be
exactly the plan's, grouped into the same streams, or :func:`match` raises naming the block.
The plan is plain data (JSON-serialisable), so ``save_pretrained`` can store it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from ..errors import ConversionError
from .residuals import Residual
from .streams import Stream

#: where the stream ends (expand/reduce modules) are registered on the converted model
STREAMS_MODULE = "mhc_streams"


@dataclasses.dataclass(frozen=True)
class PlannedBlock:
    """One residual block of the plan.

    Attributes:
        owner: module path of the add (``""`` for the model itself); position: index among the
        owner's residual adds; name: readable name (owner + branch submodule); connection:
        module path of its connection; channels: C; feature_dim: -1 or 1.
    """

    owner: str
    position: int
    name: str
    connection: str
    channels: int
    feature_dim: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.owner, self.position, self.channels, self.feature_dim)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Streams of planned blocks, in graph order; stream i's ends are ``mhc_streams.i``."""

    streams: tuple[tuple[PlannedBlock, ...], ...]

    @property
    def blocks(self) -> list[PlannedBlock]:
        return [b for s in self.streams for b in s]

    def to_dict(self) -> dict:
        return {"streams": [[dataclasses.asdict(b) for b in s] for s in self.streams]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(tuple(tuple(PlannedBlock(**b) for b in s) for s in data["streams"]))


def block_keys(streams: list[Stream], residuals: list[Residual]) -> list[list[tuple[str, int, int, int]]]:
    """``(owner, position, channels, feature_dim)`` of every block of a capture, per stream
    (``residuals``: the capture's blocks in graph order, which numbers them per owner)."""
    seen: Counter[str] = Counter()
    position = {}
    for res in residuals:
        position[res] = seen[res.owner]
        seen[res.owner] += 1
    return [[(b.owner, position[b], b.channels, b.feature_dim) for b in s.blocks] for s in streams]


def make_plan(streams: list[Stream], residuals: list[Residual], connection_path) -> Plan:
    """The plan of a first capture; ``connection_path(stream_index, block_index, residual)``
    names (and registers) each block's connection module."""
    keys = block_keys(streams, residuals)
    return Plan(
        tuple(
            tuple(
                PlannedBlock(owner, pos, res.name, connection_path(i, k, res), channels, fdim)
                for k, (res, (owner, pos, channels, fdim)) in enumerate(zip(s.blocks, keys[i]))
            )
            for i, s in enumerate(streams)
        )
    )


def _describe(key: tuple[str, int, int, int]) -> str:
    owner, position, channels, _ = key
    return f"residual add #{position} of {owner or 'the model itself'} (C={channels})"


def match(plan: Plan, streams: list[Stream], residuals: list[Residual], context: str) -> list[list[str]]:
    """The connection path of every block of a capture's ``streams``, from the plan.

    Raises:
        ConversionError: the capture's blocks or streams differ from the plan's (``context``
            says which call it was).
    """
    found = block_keys(streams, residuals)
    planned = [[b.key for b in s] for s in plan.streams]
    if found == planned:
        return [[b.connection for b in s] for s in plan.streams]
    have, want = Counter(k for s in found for k in s), Counter(k for s in planned for k in s)
    missing, new = list((want - have).elements()), list((have - want).elements())
    if missing or new:
        parts = [f"{_describe(k)} is planned but not in this call's graph" for k in missing]
        parts += [f"{_describe(k)} is new in this call's graph" for k in new]
        detail = "; ".join(parts)
    else:
        detail = (
            f"the same blocks chain into different streams ({[len(s) for s in found]} blocks per stream, "
            f"planned {[len(s) for s in planned]})"
        )
    raise ConversionError(
        f"{context}: the residual structure differs from the conversion's plan: {detail}. The converted "
        "model computes the plan's function only; call it with inputs and flags whose graph has the same "
        "residual blocks, or convert again with example inputs of this kind"
    )

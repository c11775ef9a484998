"""``param_groups``: optimiser groups that keep weight decay off static mixing parameters."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW-style groups: everything with ``weight_decay``, and the static mixing
    parameters (those a submodule lists in ``no_weight_decay()``: HC's static matrices, mHC's
    bias and gating scalars, learned reduce weights) with 0 (HC paper §4).

    Args:
        model: a converted model (any module works: without connections, one group is empty).
        weight_decay: the decay of the first group.
    """
    static: set[int] = set()
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            for name in names():
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter):
                    static.add(id(param))
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in static]
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in static]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]

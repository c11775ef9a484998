"""The Sinkhorn projection as exported for a runtime: the same function, laid out for ONNX Runtime.

The reference (:func:`mhc_fx.nn.functional.sinkhorn`) iterates in the log domain: ``2·iters``
``LogSoftmax`` over the tiny innermost axes of ``[T, n, n]``, which ONNX Runtime runs slowly (its
reductions want the long axis innermost) and which is finite at any logit spread. The exported
projection is one ``torch.cond`` (an ONNX ``If``) on the largest logit spread of the call:

- **division form** (taken when every token's logits spread less than :func:`safe_spread`):
  ``M = exp(L − max_token)`` laid out tokens-last ``[n, n, T]``, then ``iters`` times: divide by the
  column sums, then by the row sums — the paper's iteration, a few large ops;
- **otherwise the reference**, as it is.

Why the division form is exact there: every iterate is ``D₁·M·D₂`` (positive diagonals) whose
last normalisation made its rows (or columns) sum to 1. After a column normalisation two scalings
of the same row satisfy ``b_j / b_k = Σ_i a_i M_ik / Σ_i a_i M_ij ≤ max_i M_ik / M_ij ≤ e^s`` (s:
the token's spread, entries of M in ``[e^{−s}, 1]``), and likewise for rows after a row
normalisation, so two entries of one row (column) differ by at most ``e^{2s}``; the row sums to 1,
so its largest entry is ``≥ 1/n`` and every entry ``≥ e^{−2s}/n``. Below ``safe_spread`` that
stays above the smallest normal float (with a margin of e⁴), so no sum is 0, nothing underflows,
and each division is correct to rounding: the two forms agree to float rounding (checked against
float64 in the tests), while a larger spread takes the reference, finite at any spread.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from ..nn import functional as MF
from ..nn.connections import Sinkhorn

#: e⁴ between the smallest Sinkhorn iterate and the smallest normal float
MARGIN = 4.0


def safe_spread(n: int, dtype: torch.dtype) -> float:
    """The largest per-token logit spread (max − min) for which the division form keeps every
    iterate of an ``n×n`` Sinkhorn above ``e^MARGIN`` times the smallest normal ``dtype`` float:
    ``(−ln(tiny) − ln n − MARGIN) / 2`` (≈ 41 for float32, n = 4)."""
    return (-math.log(torch.finfo(dtype).tiny) - math.log(n) - MARGIN) / 2


def division_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The paper's division iteration on ``[..., n, n]`` logits, computed tokens-last ``[n, n, T]``
    (exact only below :func:`safe_spread`; see the module docstring)."""
    n = logits.shape[-1]
    flat = logits.reshape(-1, n * n)  # [T, n²]
    m = torch.exp(flat - flat.amax(-1, keepdim=True))
    # reshape–transpose–reshape: ORT's transpose optimiser cancels a bare permute back onto [T, n, n]
    m = m.transpose(0, 1).reshape(n, n, -1)  # [n (row), n (column), T]
    for _ in range(iters):
        m = m / m.sum(0, keepdim=True)  # columns
        m = m / m.sum(1, keepdim=True)  # rows
    return m.reshape(n * n, -1).transpose(0, 1).contiguous().reshape(logits.shape)


def runtime_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`mhc_fx.nn.functional.sinkhorn` of ``logits [..., n, n]``: the division form when
    every token's spread is below :func:`safe_spread`, else the reference — one ``torch.cond``
    when traced (an export), a Python branch when run eagerly. ``n = 1`` is the reference (1×1)."""
    n = logits.shape[-1]
    if n == 1:
        return MF.sinkhorn(logits, iters)
    log_m = logits.to(MF.compute_dtype(logits.dtype)).reshape(-1, n, n)  # [T, n, n]: plain strides in both branches
    flat = log_m.reshape(-1, n * n)
    spreads = torch.cat([flat.amax(-1) - flat.amin(-1), flat.new_zeros(1)])  # [T + 1]: defined at T = 0
    safe = spreads.amax(0) < safe_spread(n, log_m.dtype)
    if not torch.compiler.is_compiling():
        out = division_sinkhorn(log_m, iters) if bool(safe) else MF.sinkhorn(log_m, iters)
    else:  # both branches dense: cond needs equal strides
        out = torch.cond(safe, lambda x: division_sinkhorn(x, iters), lambda x: MF.sinkhorn(x, iters).contiguous(), (log_m,))
    return out.reshape(logits.shape)


@contextlib.contextmanager
def runtime_sinkhorns(model: nn.Module) -> Iterator[None]:
    """While active, every paper-form :class:`~mhc_fx.nn.connections.Sinkhorn` module of ``model``
    computes :func:`runtime_sinkhorn` (what an export traces); afterwards the reference again.
    Other forms keep their own spelling (DeepSeek-V4's is already a division form, finite at any
    spread)."""
    modules = [m for m in model.modules() if isinstance(m, Sinkhorn) and m.form == MF.PAPER]
    for module in modules:
        module.forward = lambda logits, iters=module.iters: runtime_sinkhorn(logits, iters)
    try:
        yield
    finally:
        for module in modules:
            del module.forward

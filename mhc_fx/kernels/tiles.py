"""Tiles shared by the Triton kernels of :mod:`.pre` and :mod:`.post_res`: which tokens a
program owns, their int64 element offsets, and masked loads/stores of ``[BT, NP, BC]`` stream
tiles, ``[BT, BC]`` token tiles and ``[BT, NP]`` coefficient tiles, plus the mixing step
``H_res·X + H_postᵀ·y`` both sides use.

Canonical view: ``X [T, n, C]``, ``y [T, C]``, ``H_post [T, n]``, ``H_res [T, n, n]``; a
program owns ``BT`` tokens and walks the channels in steps of ``BC``; ``NP`` is n padded to a
power of two. Token indices are int64: ``t·n·C`` passes 2³¹ at 131k tokens of n=4, C=4096.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import runtime


@triton.jit
def _program_tokens(pid, T, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """Program ``pid``'s tokens ``t [BT]`` (int64: ``t·n·C`` passes 2³¹ at 131k tokens of
    n=4, C=4096) and streams ``i [NP]``, with their validity masks."""
    t = pid.to(tl.int64) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    return t, t < T, i, i < N


@triton.jit
def _stream_offsets(t, i, c, N: tl.constexpr, C):
    """Element offsets ``[BT, NP, BC]`` of ``[T, n, C]`` at tokens t (int64), streams i, channels c."""
    return t[:, None, None] * (N * C) + i[None, :, None] * C + c[None, None, :]


@triton.jit
def _token_tile(PTR, t, tm, c, cm, C):
    """``[BT, BC]`` tile of a ``[T, C]`` tensor (zeros outside), as stored."""
    return tl.load(PTR + t[:, None] * C + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0)


@triton.jit
def _stream_tile(PTR, t, tm, i, im, c, cm, N: tl.constexpr, C):
    """``[BT, NP, BC]`` tile of a ``[T, n, C]`` tensor (zeros outside), as stored."""
    mask = tm[:, None, None] & im[None, :, None] & cm[None, None, :]
    return tl.load(PTR + _stream_offsets(t, i, c, N, C), mask=mask, other=0.0)


@triton.jit
def _store_stream_tile(PTR, value, t, tm, i, im, c, cm, N: tl.constexpr, C):
    mask = tm[:, None, None] & im[None, :, None] & cm[None, None, :]
    tl.store(PTR + _stream_offsets(t, i, c, N, C), value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _coef_tile(PTR, t, tm, i, im, N: tl.constexpr):
    """``[BT, NP]`` tile of a ``[T, n]`` coefficient."""
    return tl.load(PTR + t[:, None] * N + i[None, :], mask=tm[:, None] & im[None, :], other=0.0)


@triton.jit
def _res_column(HRES, t, tm, i, im, j, N: tl.constexpr):
    """``H_res[:, :, j]`` as a ``[BT, NP]`` tile."""
    return tl.load(HRES + t[:, None] * (N * N) + i[None, :] * N + j, mask=tm[:, None] & im[None, :], other=0.0)


@triton.jit
def _mix(X, HRES, hpost, y, t, tm, i, im, c, cm, C, N: tl.constexpr):
    """One channel step of ``H_res·X + H_postᵀ·y``: ``[BT, NP, BC]`` in the compute dtype."""
    acc_t = HRES.dtype.element_ty
    out = hpost[:, :, None] * y[:, None, :]
    for j in tl.static_range(N):
        xj = tl.load(X + t[:, None] * (N * C) + j * C + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
        hj = _res_column(HRES, t, tm, i, im, j, N)
        out += hj[:, :, None] * xj.to(acc_t)[:, None, :]
    return out


def _grid(T: int) -> tuple[int]:
    """One program per ``BLOCK_T`` tokens."""
    return (triton.cdiv(T, runtime.BLOCK_T),)

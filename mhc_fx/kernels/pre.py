"""Triton kernels of the mHC pre side: coefficients, on-chip Sinkhorn and ``h = H_pre·X``.

Imported on the first launch (see :mod:`mhc_fx.kernels.runtime`). Canonical view: stream
``X [T, n, C]``, ``φ [n·C, K]`` with ``K = n² + 2n`` (columns ``[pre n | post n | res n²]``),
``α [3]``, ``b [K]``; coefficients in the compute dtype (fp32; fp64 for fp64 streams).

Tiles. A program owns ``BT`` tokens. Stream values are read as ``[BT, NP, BC]`` tiles (``NP``
= n padded to a power of two, ``BC`` channels per step) and flattened to ``[BT, NP·BC]`` for
``tl.dot`` with the matching rows of φ. The pre and post coefficient columns are computed in
``W = 16``-wide tiles (``tl.dot`` needs ≥ 16 columns; n ≤ 8) and narrowed to ``[BT, NP]``;
the res logits in an ``[BT, RP·RP]`` tile reshaped to ``[BT, RP, RP]`` (``RP`` = max(NP, 4)).
Padded rows/columns are masked to zero everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import _coef_tile, _grid, _mix, _program_tokens, _store_stream_tile, _stream_tile, _token_tile
from .cpu_path import gate_and_bias_grads
from ..nn.functional import Form


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp on [BT, RP, RP] tiles (mHC Eq. 9), in the log domain (no 0/0 when a column of
# exp(L − max) underflows; the same function in exact arithmetic):
#   L⁰ = logits;  t_max times:  L ← L − LSE_columns(L),  L ← L − LSE_rows(L);   H_res = exp(L)
# Backward, for G = ∂L/∂H_res: g = G ∘ H_res, then for each step from the last, with P = exp(L')
# the normalised matrix after that step:  g ← g − P · Σ_axis g   (rows, then columns).
# The iterates are recomputed from the logits for every backward step (t_max²/2 tiny steps in
# registers), so the gradient is the exact one of the unrolled loop, with nothing stored.
# Padding (rows/columns ≥ n) holds −inf logits, so exp gives exact zeros there.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _log_normalize_columns(L, valid):
    top = tl.where(valid[None, :], tl.max(L, axis=1), 0.0)  # [BT, RP], per column
    s = tl.sum(tl.exp(L - top[:, None, :]), axis=1)
    lse = top + tl.log(tl.where(valid[None, :], s, 1.0))
    return L - lse[:, None, :]


@triton.jit
def _log_normalize_rows(L, valid):
    top = tl.where(valid[None, :], tl.max(L, axis=2), 0.0)  # [BT, RP], per row
    s = tl.sum(tl.exp(L - top[:, :, None]), axis=2)
    lse = top + tl.log(tl.where(valid[None, :], s, 1.0))
    return L - lse[:, :, None]


@triton.jit
def _sinkhorn_start(logits, valid):
    both = valid[:, None] & valid[None, :]
    return tl.where(both[None, :, :], logits, float("-inf"))


@triton.jit
def _sinkhorn_iterate(L, valid, steps):
    for _ in range(steps):
        L = _log_normalize_rows(_log_normalize_columns(L, valid), valid)
    return L


@triton.jit
def _log_sinkhorn(logits, valid, iters):
    """``H_res [BT, RP, RP]`` (zeros in the padding) of ``logits [BT, RP, RP]``."""
    return tl.exp(_sinkhorn_iterate(_sinkhorn_start(logits, valid), valid, iters))


@triton.jit
def _log_sinkhorn_bwd(logits, G, valid, iters):
    """``∂L/∂logits`` for ``G = ∂L/∂H_res`` (both ``[BT, RP, RP]``)."""
    L0 = _sinkhorn_start(logits, valid)
    both = valid[:, None] & valid[None, :]
    g = tl.where(both[None, :, :], G, 0.0) * tl.exp(_sinkhorn_iterate(L0, valid, iters))
    for k in range(iters):
        columns = _log_normalize_columns(_sinkhorn_iterate(L0, valid, iters - 1 - k), valid)
        rows = _log_normalize_rows(columns, valid)
        g = g - tl.exp(rows) * tl.sum(g, axis=2)[:, :, None]
        g = g - tl.exp(columns) * tl.sum(g, axis=1)[:, None, :]
    return g


# ---------------------------------------------------------------------------------------------
# Division forms (DeepSeek-V4's; DESIGN §2 "Forms", mhc_fx.nn.functional.Form), constants
# DIVISION, SOFTMAX_START, COLUMN_PARITY (0: the first division normalises columns, 1: rows;
# they alternate), TRANSPOSED and the runtime res_eps:
#   M⁰ = softmax_rows(logits) + ε  (or exp(logits − max));  then 2·iters − SOFTMAX_START steps
#   M ← M / (Σ_axis M + ε);  H_res = M (Mᵀ when TRANSPOSED)
# as (first, second) pairs, plus one first-kind step after the softmax start. Backward, for
# g = ∂L/∂M after a step M' = M / d:  g ← (g − Σ_axis g·M') / d, the iterates recomputed from
# M⁰ for each pair (as the log form's); the start: g ← P·(g − Σ_rows g·P) for the softmax P,
# g·P for exp(logits − max). Every branch is on constexprs (no runtime branch in the loops).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _divide(M, valid, res_eps, COLUMNS: tl.constexpr):
    """``(M / d, 1 / d)`` with ``d = Σ M + ε`` over the columns (``COLUMNS``) or the rows (one
    division per row or column, then products: IEEE divisions cost registers)."""
    if COLUMNS:
        r = 1.0 / tl.where(valid[None, :], tl.sum(M, axis=1) + res_eps, 1.0)  # [BT, RP], per column
        out = M * r[:, None, :]
    else:
        r = 1.0 / tl.where(valid[None, :], tl.sum(M, axis=2) + res_eps, 1.0)  # [BT, RP], per row
        out = M * r[:, :, None]
    return out, r


@triton.jit
def _divide_bwd(M, g, valid, res_eps, COLUMNS: tl.constexpr):
    """The gradient before :func:`_divide` of ``M`` for the gradient ``g`` after it."""
    out, r = _divide(M, valid, res_eps, COLUMNS)
    if COLUMNS:
        g = (g - tl.sum(g * out, axis=1)[:, None, :]) * r[:, None, :]
    else:
        g = (g - tl.sum(g * out, axis=2)[:, :, None]) * r[:, :, None]
    return g


@triton.jit
def _division_start(logits, valid, res_eps, SOFTMAX_START: tl.constexpr):
    """``(M⁰, P)``: the first iterate and the normalised exponentials it is made of."""
    both = valid[:, None] & valid[None, :]
    L = tl.where(both[None, :, :], logits, float("-inf"))
    if SOFTMAX_START:
        top = tl.where(valid[None, :], tl.max(L, axis=2), 0.0)
        e = tl.exp(L - top[:, :, None])
        P = e * (1.0 / tl.where(valid[None, :], tl.sum(e, axis=2), 1.0))[:, :, None]
        M = tl.where(both[None, :, :], P + res_eps, 0.0)
    else:
        top = tl.max(tl.max(tl.where(both[None, :, :], logits, float("-inf")), axis=2), axis=1)
        P = tl.exp(L - top[:, None, None])
        M = P
    return M, P


@triton.jit
def _division_pairs(M, valid, res_eps, pairs, COLUMN_PARITY: tl.constexpr):
    for _ in range(pairs):
        M, _d = _divide(M, valid, res_eps, COLUMN_PARITY == 0)
        M, _d = _divide(M, valid, res_eps, COLUMN_PARITY == 1)
    return M


@triton.jit
def _division_sinkhorn(logits, valid, iters, res_eps, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr):
    M, _P = _division_start(logits, valid, res_eps, SOFTMAX_START)
    if SOFTMAX_START:  # the softmax was the first rows step: iters − 1 pairs, then one more
        M = _division_pairs(M, valid, res_eps, iters - 1, COLUMN_PARITY)
        M, _d = _divide(M, valid, res_eps, COLUMN_PARITY == 0)
    else:
        M = _division_pairs(M, valid, res_eps, iters, COLUMN_PARITY)
    return M


@triton.jit
def _division_sinkhorn_bwd(logits, g, valid, iters, res_eps, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr):
    M0, P = _division_start(logits, valid, res_eps, SOFTMAX_START)
    pairs = iters
    if SOFTMAX_START:
        pairs = iters - 1
        g = _divide_bwd(_division_pairs(M0, valid, res_eps, pairs, COLUMN_PARITY), g, valid, res_eps, COLUMN_PARITY == 0)
    for j in range(pairs):
        before = _division_pairs(M0, valid, res_eps, pairs - 1 - j, COLUMN_PARITY)
        middle, _d = _divide(before, valid, res_eps, COLUMN_PARITY == 0)
        g = _divide_bwd(middle, g, valid, res_eps, COLUMN_PARITY == 1)
        g = _divide_bwd(before, g, valid, res_eps, COLUMN_PARITY == 0)
    if SOFTMAX_START:
        g = P * (g - tl.sum(g * P, axis=2)[:, :, None])
    else:
        g = g * P
    return g


@triton.jit
def _sinkhorn(
    logits, valid, iters, res_eps,
    DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """``H_res [BT, RP, RP]`` of the form (zeros in the padding)."""
    if DIVISION:
        H = _division_sinkhorn(logits, valid, iters, res_eps, SOFTMAX_START, COLUMN_PARITY)
    else:
        H = _log_sinkhorn(logits, valid, iters)
    if TRANSPOSED:
        H = tl.permute(H, (0, 2, 1))
    return H


@triton.jit
def _sinkhorn_bwd(
    logits, G, valid, iters, res_eps,
    DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """``∂L/∂logits`` for ``G = ∂L/∂H_res`` (both ``[BT, RP, RP]``) in the form."""
    if TRANSPOSED:
        G = tl.permute(G, (0, 2, 1))
    if DIVISION:
        both = valid[:, None] & valid[None, :]
        g = _division_sinkhorn_bwd(logits, tl.where(both[None, :, :], G, 0.0), valid, iters, res_eps, SOFTMAX_START,
                                   COLUMN_PARITY)
        g = tl.where(both[None, :, :], g, 0.0)
    else:
        g = _log_sinkhorn_bwd(logits, G, valid, iters)
    return g


# ---------------------------------------------------------------------------------------------
# Coefficients of one token (mHC Eq. 7–8, RMSNorm after the matmul):
#   r = sqrt(Σ v² / nC + eps),  raw = v·φ,  hn = raw / r,  h̃ = α_group · hn + b
#   H_pre = σ(h̃_pre) + pre_eps,  H_post = 2σ(h̃_post),  H_res = Sinkhorn(h̃_res) (in the form)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _narrow(v, BT: tl.constexpr, W: tl.constexpr, NP: tl.constexpr):
    """``[BT, W]`` with zeros past column NP → ``[BT, NP]``."""
    return tl.sum(tl.reshape(v, [BT, W // NP, NP]), axis=1)


@triton.jit
def _widen(v, W: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """``[BT, NP]`` → ``[BT, W]`` with zeros past column NP."""
    g = tl.arange(0, W // NP)
    return tl.reshape(tl.where(g[None, :, None] == 0, v[:, None, :], 0.0), [BT, W])


@triton.jit
def _phi_rows(c0, C, N: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """Rows of φ ``[NP·BC]`` (and their mask) matching a flattened ``[BT, NP, BC]`` stream tile
    at channel step ``c0``: row ``i·C + c`` for stream i, channel c."""
    f = tl.arange(0, NP * BC)
    stream, ch = f // BC, c0 + f % BC
    return stream * C + ch, (stream < N) & (ch < C)


@triton.jit
def _phi_columns(N: tl.constexpr, W: tl.constexpr, RP: tl.constexpr):
    """Column offsets and masks of the coefficient tiles: ``w [W]`` (pre at 0, post at N) and
    ``q [RP²]``, the res tile's offsets ``i·n + j`` past column 2N."""
    w = tl.arange(0, W)
    q = tl.arange(0, RP * RP)
    return w, w < N, q // RP * N + q % RP, (q // RP < N) & (q % RP < N)


@triton.jit
def _zero_projections(acc_t: tl.constexpr, BT: tl.constexpr, W: tl.constexpr, RP: tl.constexpr):
    """Accumulators of :func:`_project`: ``Σv² [BT]``, pre/post ``[BT, W]``, res ``[BT, RP²]``."""
    return tl.zeros([BT], acc_t), tl.zeros([BT, W], acc_t), tl.zeros([BT, W], acc_t), tl.zeros([BT, RP * RP], acc_t)


@triton.jit
def _project(
    x, PHI, c0, C, sumsq, raw_pre, raw_post, raw_res,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
):
    """Add one channel step's ``Σ v²`` and ``v·φ`` (x: ``[BT, NP, BC]``, compute dtype)."""
    sumsq += tl.sum(tl.sum(x * x, axis=2), axis=1)
    x2 = tl.reshape(x, [BT, NP * BC])
    rows, rm = _phi_rows(c0, C, N, NP, BC)
    w, wm, q, qm = _phi_columns(N, W, RP)
    base = PHI + rows[:, None] * K
    p = tl.load(base + w[None, :], mask=rm[:, None] & wm[None, :], other=0.0)
    raw_pre = tl.dot(x2, p, raw_pre, input_precision=PREC)
    p = tl.load(base + N + w[None, :], mask=rm[:, None] & wm[None, :], other=0.0)
    raw_post = tl.dot(x2, p, raw_post, input_precision=PREC)
    p = tl.load(base + 2 * N + q[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
    raw_res = tl.dot(x2, p, raw_res, input_precision=PREC)
    return sumsq, raw_pre, raw_post, raw_res


@triton.jit
def _coefficients(
    sumsq, raw_pre, raw_post, raw_res, ALPHA, BIAS, C, eps, pre_eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr,
):
    """``r [BT]``, normalised projections ``hn_pre/hn_post [BT, NP]``, ``hn_res [BT, RP, RP]``,
    ``H_pre``, ``H_post [BT, NP]`` and the Sinkhorn logits ``[BT, RP, RP]``."""
    r = tl.sqrt(sumsq / (N * C) + eps)
    i = tl.arange(0, NP)
    im = i < N
    ri = tl.arange(0, RP)
    rim = ri < N
    hn_pre = _narrow(raw_pre, BT, W, NP) / r[:, None]
    hn_post = _narrow(raw_post, BT, W, NP) / r[:, None]
    hn_res = tl.reshape(raw_res, [BT, RP, RP]) / r[:, None, None]
    b_pre = tl.load(BIAS + i, mask=im, other=0.0)
    b_post = tl.load(BIAS + N + i, mask=im, other=0.0)
    b_res = tl.load(BIAS + 2 * N + ri[:, None] * N + ri[None, :], mask=rim[:, None] & rim[None, :], other=0.0)
    H_pre = tl.where(im[None, :], tl.sigmoid(tl.load(ALPHA) * hn_pre + b_pre[None, :]) + pre_eps, 0.0)
    H_post = tl.where(im[None, :], 2.0 * tl.sigmoid(tl.load(ALPHA + 1) * hn_post + b_post[None, :]), 0.0)
    logits = tl.load(ALPHA + 2) * hn_res + b_res[None, :, :]
    return r, hn_pre, hn_post, hn_res, H_pre, H_post, logits


@triton.jit
def _store_pair(PTR, v, t, tm, i, im, N: tl.constexpr, K: tl.constexpr, COL: tl.constexpr):
    """Store ``v [BT, NP]`` into columns ``COL..COL+n`` of a ``[T, K]`` tensor."""
    tl.store(PTR + t[:, None] * K + COL + i[None, :], v, mask=tm[:, None] & im[None, :])


@triton.jit
def _store_square(PTR, v, t, tm, ri, rim, N: tl.constexpr, K: tl.constexpr, COL: tl.constexpr):
    """Store ``v [BT, RP, RP]`` (n×n valid) row-major into columns ``COL..`` of ``[T, K]``."""
    offs = t[:, None, None] * K + COL + ri[None, :, None] * N + ri[None, None, :]
    tl.store(PTR + offs, v, mask=tm[:, None, None] & rim[None, :, None] & rim[None, None, :])


@triton.jit
def _pre_mix_pass(X, H, H_pre, t, tm, i, im, C, N: tl.constexpr, BC: tl.constexpr):
    """``h[t, c] = Σ_i H_pre[t, i] · X[t, i, c]`` over all channels (stored in H's dtype)."""
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        x = _stream_tile(X, t, tm, i, im, c, cm, N, C).to(H_pre.dtype)
        h = tl.sum(H_pre[:, :, None] * x, axis=1)
        tl.store(H + t[:, None] * C + c[None, :], h.to(H.dtype.element_ty), mask=tm[:, None] & cm[None, :])


@triton.jit
def _finish_pre(
    X, H, HPRE, HPOST, HRES, ALPHA, BIAS, sumsq, raw_pre, raw_post, raw_res, t, tm, C, eps, iters, pre_eps, res_eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Epilogue of both pre forwards: coefficients, Sinkhorn, stores, then ``h = H_pre·X``."""
    i = tl.arange(0, NP)
    im = i < N
    ri = tl.arange(0, RP)
    rim = ri < N
    _r, _a, _b, _c, H_pre, H_post, logits = _coefficients(
        sumsq, raw_pre, raw_post, raw_res, ALPHA, BIAS, C, eps, pre_eps, N, NP, W, RP, BT
    )
    H_res = _sinkhorn(logits, rim, iters, res_eps, DIVISION, SOFTMAX_START, COLUMN_PARITY, TRANSPOSED)
    _store_pair(HPRE, H_pre, t, tm, i, im, N, N, 0)
    _store_pair(HPOST, H_post, t, tm, i, im, N, N, 0)
    _store_square(HRES, H_res, t, tm, ri, rim, N, N * N, 0)
    _pre_mix_pass(X, H, H_pre, t, tm, i, im, C, N, BC)


@triton.jit
def _pre_fwd(
    X, PHI, ALPHA, BIAS, H, HPRE, HPOST, HRES, T, C, eps, iters, pre_eps, res_eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    acc_t = PHI.dtype.element_ty
    t, tm, i, im = _program_tokens(tl.program_id(0), T, N, NP, BT)
    sumsq, raw_pre, raw_post, raw_res = _zero_projections(acc_t, BT, W, RP)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        x = _stream_tile(X, t, tm, i, im, c, c < C, N, C).to(acc_t)
        sumsq, raw_pre, raw_post, raw_res = _project(
            x, PHI, c0, C, sumsq, raw_pre, raw_post, raw_res, N, NP, W, RP, K, BT, BC, PREC
        )
    _finish_pre(X, H, HPRE, HPOST, HRES, ALPHA, BIAS, sumsq, raw_pre, raw_post, raw_res, t, tm, C, eps, iters,
                pre_eps, res_eps, N, NP, W, RP, BT, BC, DIVISION, SOFTMAX_START, COLUMN_PARITY, TRANSPOSED)


# ---------------------------------------------------------------------------------------------
# Cross-layer fusion: X_next = H_res·X + H_postᵀ·y (block l), then pre of block l+1 on X_next.
# The statistics and v·φ of block l+1 are taken from X_next while it is in registers (rounded
# to the stream dtype first, exactly as the unfused pre would read it), saving one n·C read.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _post_res_pre_fwd(
    X, Y, HPOST_IN, HRES_IN, PHI, ALPHA, BIAS, XN, H, HPRE, HPOST, HRES, T, C, eps, iters, pre_eps, res_eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    acc_t = PHI.dtype.element_ty
    t, tm, i, im = _program_tokens(tl.program_id(0), T, N, NP, BT)
    hpost_in = _coef_tile(HPOST_IN, t, tm, i, im, N)
    sumsq, raw_pre, raw_post, raw_res = _zero_projections(acc_t, BT, W, RP)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        y = _token_tile(Y, t, tm, c, cm, C).to(acc_t)
        out = _mix(X, HRES_IN, hpost_in, y, t, tm, i, im, c, cm, C, N)
        _store_stream_tile(XN, out, t, tm, i, im, c, cm, N, C)
        x = out.to(XN.dtype.element_ty).to(acc_t)  # zero in masked lanes, like a masked load
        sumsq, raw_pre, raw_post, raw_res = _project(
            x, PHI, c0, C, sumsq, raw_pre, raw_post, raw_res, N, NP, W, RP, K, BT, BC, PREC
        )
    tl.debug_barrier()  # X_next was written by other threads of this program; h reads it back
    _finish_pre(XN, H, HPRE, HPOST, HRES, ALPHA, BIAS, sumsq, raw_pre, raw_post, raw_res, t, tm, C, eps, iters,
                pre_eps, res_eps, N, NP, W, RP, BT, BC, DIVISION, SOFTMAX_START, COLUMN_PARITY, TRANSPOSED)


# ---------------------------------------------------------------------------------------------
# Backward of pre, for upstream gradients dh [T, C], dH_pre, dH_post [T, n], dH_res [T, n, n]:
#   dH_pre += X·dh (per stream);  dh̃_pre = dH_pre·σ'(h̃_pre);  dh̃_post = dH_post·2σ'(h̃_post)
#   dh̃_res = Sinkhorn backward (exact, recomputed);  draw = α_group · dh̃ / r
#   dr = −Σ_k α_k dh̃_k hn_k / r;  dX = draw·φᵀ + dr·v/(nC·r) + H_preᵀ·dh
# Per token it writes dh̃, hn and draw ([T, K]); dφ = Σ_t v_tᵀ draw_t is a second kernel over
# row blocks of φ (each program owns its rows: deterministic, no atomics), and db = Σ_t dh̃,
# dα_g = Σ_t Σ_{k∈g} dh̃·hn are sums over these small [T, K] tensors.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pre_bwd(
    X, PHI, ALPHA, BIAS, DH, DHPRE, DHPOST, DHRES, DX, DHT, HN, DRAW, T, C, eps, iters, pre_eps, res_eps,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, DIVISION: tl.constexpr, SOFTMAX_START: tl.constexpr, COLUMN_PARITY: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    acc_t = PHI.dtype.element_ty
    t, tm, i, im = _program_tokens(tl.program_id(0), T, N, NP, BT)
    ri = tl.arange(0, RP)
    rim = ri < N
    sumsq, raw_pre, raw_post, raw_res = _zero_projections(acc_t, BT, W, RP)
    x_dh = tl.zeros([BT, NP], acc_t)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        x = _stream_tile(X, t, tm, i, im, c, cm, N, C).to(acc_t)
        dh = _token_tile(DH, t, tm, c, cm, C).to(acc_t)
        x_dh += tl.sum(x * dh[:, None, :], axis=2)
        sumsq, raw_pre, raw_post, raw_res = _project(
            x, PHI, c0, C, sumsq, raw_pre, raw_post, raw_res, N, NP, W, RP, K, BT, BC, PREC
        )
    r, hn_pre, hn_post, hn_res, H_pre, H_post, logits = _coefficients(
        sumsq, raw_pre, raw_post, raw_res, ALPHA, BIAS, C, eps, pre_eps, N, NP, W, RP, BT
    )
    d_pre = _coef_tile(DHPRE, t, tm, i, im, N) + x_dh
    gate = H_pre - pre_eps  # σ(h̃_pre)
    d_pre = tl.where(im[None, :], d_pre * gate * (1.0 - gate), 0.0)
    half = H_post * 0.5
    d_post = _coef_tile(DHPOST, t, tm, i, im, N) * 2.0 * half * (1.0 - half)
    d_post = tl.where(im[None, :], d_post, 0.0)
    square = tm[:, None, None] & rim[None, :, None] & rim[None, None, :]
    g_res = tl.load(DHRES + t[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :], mask=square, other=0.0)
    d_res = _sinkhorn_bwd(logits, g_res, rim, iters, res_eps, DIVISION, SOFTMAX_START, COLUMN_PARITY, TRANSPOSED)
    a_pre, a_post, a_res = tl.load(ALPHA), tl.load(ALPHA + 1), tl.load(ALPHA + 2)
    _store_pair(DHT, d_pre, t, tm, i, im, N, K, 0)
    _store_pair(DHT, d_post, t, tm, i, im, N, K, N)
    _store_square(DHT, d_res, t, tm, ri, rim, N, K, 2 * N)
    _store_pair(HN, hn_pre, t, tm, i, im, N, K, 0)
    _store_pair(HN, hn_post, t, tm, i, im, N, K, N)
    _store_square(HN, hn_res, t, tm, ri, rim, N, K, 2 * N)
    draw_pre = a_pre * d_pre / r[:, None]
    draw_post = a_post * d_post / r[:, None]
    draw_res = a_res * d_res / r[:, None, None]
    _store_pair(DRAW, draw_pre, t, tm, i, im, N, K, 0)
    _store_pair(DRAW, draw_post, t, tm, i, im, N, K, N)
    _store_square(DRAW, draw_res, t, tm, ri, rim, N, K, 2 * N)
    dr = -(tl.sum(draw_pre * hn_pre, axis=1) + tl.sum(draw_post * hn_post, axis=1)
           + tl.sum(tl.sum(draw_res * hn_res, axis=2), axis=1))
    x_coef = dr / (N * C * r)  # ∂r/∂v = v / (nC·r)
    wide_pre = _widen(draw_pre, W, NP, BT)
    wide_post = _widen(draw_post, W, NP, BT)
    flat_res = tl.reshape(draw_res, [BT, RP * RP])
    w, wm, q, qm = _phi_columns(N, W, RP)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        rows, rm = _phi_rows(c0, C, N, NP, BC)
        base = PHI + rows[None, :] * K
        dv = tl.zeros([BT, NP * BC], acc_t)
        p = tl.load(base + w[:, None], mask=wm[:, None] & rm[None, :], other=0.0)
        dv = tl.dot(wide_pre, p, dv, input_precision=PREC)
        p = tl.load(base + N + w[:, None], mask=wm[:, None] & rm[None, :], other=0.0)
        dv = tl.dot(wide_post, p, dv, input_precision=PREC)
        p = tl.load(base + 2 * N + q[:, None], mask=qm[:, None] & rm[None, :], other=0.0)
        dv = tl.dot(flat_res, p, dv, input_precision=PREC)
        x = _stream_tile(X, t, tm, i, im, c, cm, N, C).to(acc_t)
        dh = _token_tile(DH, t, tm, c, cm, C).to(acc_t)
        dx = tl.reshape(dv, [BT, NP, BC]) + x_coef[:, None, None] * x + H_pre[:, :, None] * dh[:, None, :]
        _store_stream_tile(DX, dx, t, tm, i, im, c, cm, N, C)


@triton.jit
def _pre_bwd_phi(
    X, DRAW, DPHI, T, NC, tokens_per_split,
    K: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
):
    """``dφ_partial[split] = Σ_{t in split} vec(X_t)ᵀ · draw_t`` for one block of φ's rows."""
    acc_t = DRAW.dtype.element_ty
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    km = k < NC
    split = tl.program_id(1)
    col = tl.arange(0, KP)
    colm = col < K
    acc = tl.zeros([BK, KP], acc_t)
    start = split * tokens_per_split
    for t0 in range(start, start + tokens_per_split, BT):
        t = t0 + tl.arange(0, BT).to(tl.int64)  # t·nC passes 2³¹ on long sequences
        tm = t < T
        v = tl.load(X + t[None, :] * NC + k[:, None], mask=km[:, None] & tm[None, :], other=0.0).to(acc_t)
        d = tl.load(DRAW + t[:, None] * K + col[None, :], mask=tm[:, None] & colm[None, :], other=0.0)
        acc = tl.dot(v, d, acc, input_precision=PREC)
    tl.store(DPHI + split.to(tl.int64) * NC * K + k[:, None] * K + col[None, :], acc, mask=km[:, None] & colm[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _coefficient_outputs(X: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
    T, n, C = X.shape
    new = runtime.new_output
    return (new((T, C), X.dtype, X.device), new((T, n), acc, X.device), new((T, n), acc, X.device),
            new((T, n, n), acc, X.device))


def mhc_pre_fwd(
    X: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float, form: Form,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [T, C], H_pre [T, n], H_post [T, n], H_res [T, n, n])`` of a contiguous ``X [T, n, C]``
    in ``form``; ``phi``, ``alpha``, ``bias`` contiguous in the compute dtype."""
    T = X.shape[0]
    outs = _coefficient_outputs(X, phi.dtype)
    if T:
        _pre_fwd[_grid(T)](
            X, phi, alpha, bias, *outs, T, X.shape[2], eps, iters, form.pre_eps, form.res_eps,
            **runtime.launch_for("pre_fwd", X, form).kwargs(),
        )
        runtime.count("mhc_pre_fwd")
    return outs


def post_res_pre_fwd(
    X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor,
    phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float, form: Form,
) -> tuple[torch.Tensor, ...]:
    """``(X_next [T, n, C], h, H_pre, H_post, H_res)``: post_res of one block and pre of the next
    (in ``form``)."""
    T = X.shape[0]
    X_next = runtime.new_output(X.shape, X.dtype, X.device)
    outs = _coefficient_outputs(X, phi.dtype)
    if T:
        _post_res_pre_fwd[_grid(T)](
            X, y, H_post, H_res, phi, alpha, bias, X_next, *outs, T, X.shape[2], eps, iters, form.pre_eps, form.res_eps,
            **runtime.launch_for("post_res_pre_fwd", X, form).kwargs(),
        )
        runtime.count("post_res_pre_fwd")
    return (X_next, *outs)


def mhc_pre_bwd(
    X: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
    dh: torch.Tensor, dH_pre: torch.Tensor, dH_post: torch.Tensor, dH_res: torch.Tensor, iters: int, eps: float,
    form: Form,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX [T, n, C], dφ [nC, K], dα [3], db [K])`` in X's / the compute dtype (``form``'s
    gradient)."""
    T, n, C = X.shape
    K, acc, dev = n * n + 2 * n, phi.dtype, X.device
    dX = runtime.new_output(X.shape, X.dtype, dev)
    dht, hn, draw = (runtime.new_output((T, K), acc, dev) for _ in range(3))
    if T:
        _pre_bwd[_grid(T)](
            X, phi, alpha, bias, dh, dH_pre, dH_post, dH_res, dX, dht, hn, draw, T, C, eps, iters,
            form.pre_eps, form.res_eps, **runtime.launch_for("pre_bwd", X, form).kwargs(),
        )
        runtime.count("mhc_pre_bwd")
    return (dX, _phi_grad(X, draw), *gate_and_bias_grads(dht, hn, n))


def _phi_grad(X: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """``dφ [nC, K] = Σ_t vec(X_t)ᵀ draw_t``: row blocks × token splits, partials summed after."""
    T, n, C = X.shape
    launch = runtime.launch_for("pre_bwd_phi", X)
    K, BK, BT = draw.shape[1], launch.constexprs["BK"], launch.constexprs["BT"]
    NC = n * C
    row_blocks = triton.cdiv(NC, BK)
    token_blocks = max(1, triton.cdiv(T, BT))
    splits = min(token_blocks, max(1, runtime.parallel_programs(X.device) // row_blocks))
    tokens_per_split = triton.cdiv(token_blocks, splits) * BT
    splits = max(1, triton.cdiv(T, tokens_per_split))
    partial = runtime.new_output((splits, NC, K), draw.dtype, X.device)
    if T:
        _pre_bwd_phi[(row_blocks, splits)](X, draw, partial, T, NC, tokens_per_split, **launch.kwargs())
        runtime.count("mhc_pre_bwd_phi")
    else:
        partial.zero_()
    return partial.sum(dim=0)

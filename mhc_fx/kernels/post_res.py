"""Triton kernels of the mHC/HC post side: ``X_next = H_res·X + H_postᵀ·y`` and its gradient.

Imported on the first launch (see :mod:`mhc_fx.kernels.runtime`). Shapes are the kernels'
canonical view: ``X [T, n, C]``, ``y [T, C]``, ``H_post [T, n]``, ``H_res [T, n, n]``; every
program owns ``BLOCK_T`` tokens and walks the channels in steps of ``BC``, so the per-token
reductions of the backward (over C) finish inside one program: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import _coef_tile, _grid, _mix, _program_tokens, _res_column, _store_stream_tile, _stream_tile, _token_tile


# ---------------------------------------------------------------------------------------------
# forward:  X_next[t, i, c] = Σ_j H_res[t, i, j] · X[t, j, c] + H_post[t, i] · y[t, c]
# traffic per token: reads (n+1)·C stream values, writes n·C.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _post_res_fwd(
    X, Y, HPOST, HRES, OUT, T, C,
    N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    t, tm, i, im = _program_tokens(tl.program_id(0), T, N, NP, BT)
    hpost = _coef_tile(HPOST, t, tm, i, im, N)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        y = _token_tile(Y, t, tm, c, cm, C).to(HRES.dtype.element_ty)
        out = _mix(X, HRES, hpost, y, t, tm, i, im, c, cm, C, N)
        _store_stream_tile(OUT, out, t, tm, i, im, c, cm, N, C)


# ---------------------------------------------------------------------------------------------
# backward, with G = ∂L/∂X_next [T, n, C]:
#   dX[t, j, c]     = Σ_i H_res[t, i, j] · G[t, i, c]
#   dy[t, c]        = Σ_i H_post[t, i] · G[t, i, c]
#   dH_res[t, i, j] = Σ_c G[t, i, c] · X[t, j, c]
#   dH_post[t, i]   = Σ_c G[t, i, c] · y[t, c]
# ---------------------------------------------------------------------------------------------
@triton.jit
def _post_res_bwd(
    X, Y, HPOST, HRES, G, DX, DY, DHPOST, DHRES, T, C,
    N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    acc_t = HRES.dtype.element_ty
    t, tm, i, im = _program_tokens(tl.program_id(0), T, N, NP, BT)
    hpost = _coef_tile(HPOST, t, tm, i, im, N)
    dhpost = tl.zeros([BT, NP], acc_t)
    dhres = tl.zeros([BT, NP, NP], acc_t)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        g = _stream_tile(G, t, tm, i, im, c, cm, N, C).to(acc_t)
        y = _token_tile(Y, t, tm, c, cm, C).to(acc_t)
        dy = tl.sum(hpost[:, :, None] * g, axis=1)
        tl.store(DY + t[:, None] * C + c[None, :], dy.to(DY.dtype.element_ty), mask=tm[:, None] & cm[None, :])
        dhpost += tl.sum(g * y[:, None, :], axis=2)
        for j in tl.static_range(N):
            xj = tl.load(X + t[:, None] * (N * C) + j * C + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
            hj = _res_column(HRES, t, tm, i, im, j, N)
            dxj = tl.sum(hj[:, :, None] * g, axis=1)
            tl.store(DX + t[:, None] * (N * C) + j * C + c[None, :], dxj.to(DX.dtype.element_ty),
                     mask=tm[:, None] & cm[None, :])
            col = tl.sum(g * xj.to(acc_t)[:, None, :], axis=2)  # [BT, NP]: dH_res[:, :, j]
            dhres += tl.where(i[None, None, :] == j, col[:, :, None], 0.0)
    tl.store(DHPOST + t[:, None] * N + i[None, :], dhpost, mask=tm[:, None] & im[None, :])
    offs = t[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    tl.store(DHRES + offs, dhres, mask=tm[:, None, None] & im[None, :, None] & im[None, None, :])


def post_res_fwd(X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor) -> torch.Tensor:
    """``X_next [T, n, C]`` (X's dtype) from contiguous ``X [T, n, C]``, ``y [T, C]`` and
    coefficients ``H_post [T, n]``, ``H_res [T, n, n]`` in the compute dtype."""
    T, C = X.shape[0], X.shape[2]
    out = runtime.new_output(X.shape, X.dtype, X.device)
    if T:
        _post_res_fwd[_grid(T)](X, y, H_post, H_res, out, T, C, **runtime.launch_for("post_res_fwd", X).kwargs())
        runtime.count("post_res_fwd")
    return out


def post_res_bwd(
    X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX [T, n, C], dy [T, C], dH_post [T, n], dH_res [T, n, n])`` for ``grad = ∂L/∂X_next``."""
    T, C = X.shape[0], X.shape[2]
    dX, dy = runtime.new_output(X.shape, X.dtype, X.device), runtime.new_output(y.shape, y.dtype, y.device)
    dH_post = runtime.new_output(H_post.shape, H_post.dtype, X.device)
    dH_res = runtime.new_output(H_res.shape, H_res.dtype, X.device)
    if T:
        _post_res_bwd[_grid(T)](
            X, y, H_post, H_res, grad, dX, dy, dH_post, dH_res, T, C, **runtime.launch_for("post_res_bwd", X).kwargs()
        )
        runtime.count("post_res_bwd")
    return dX, dy, dH_post, dH_res

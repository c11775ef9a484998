"""Connection modules: the parameters of one converted residual block, and the stream ends.

A converted block calls its connection once on the stream ``X`` to get the branch input and the
mixing coefficients, runs the original branch, then mixes::

    h, H_post, H_res = connection(X)          # X: stream, e.g. [B, T, n, C] or [B, n, C, H, W]
    y = F(h)                                  # h has the original residual's shape
    X_next = post_res_mix(X, y, H_post, H_res)

Streams may carry their stream axis anywhere (``stream_dim``; the feature axis follows it);
the math runs in the canonical ``[..., n, C]`` token layout of :mod:`mhc_fx.nn.functional`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import functional as MF

#: ``init="preserve"``: the favoured stream ``k mod n`` of block k gets H_pre weight
#: ``(n+1)/(2n)``, every other stream ``1/(2n)``; the weights sum to 1, so h = x while all
#: streams are equal, and the unequal weights break the symmetry between streams.
#: For n = 1 the single weight is σ(PRESERVE_SINGLE_LOGIT), which is 1.0 in float32.
PRESERVE_SINGLE_LOGIT = 20.0
#: ``init="preserve"``: mHC's H_res starts at the doubly stochastic matrix with this diagonal
#: (off-diagonal entries (1-d)/(n-1)): near the identity, like a plain residual, but far from
#: saturation so Sinkhorn's gradient does not vanish.
PRESERVE_RES_DIAGONAL = 0.75
#: ``init="paper"``: standard deviation of φ (the paper gives none; Liger-Kernel uses 0.02).
PAPER_PHI_STD = 0.02


def preserve_pre_weights(n: int, index: int) -> torch.Tensor:
    """H_pre weights ``[n]`` of block ``index`` under ``init="preserve"`` (sum to 1)."""
    if n == 1:
        return torch.ones(1)
    w = torch.full((n,), 1.0 / (2 * n))
    w[index % n] = (n + 1) / (2 * n)
    return w


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _res_logits(n: int) -> torch.Tensor:
    """Logits ``[n, n]`` whose Sinkhorn projection has diagonal PRESERVE_RES_DIAGONAL.

    ``exp(β·I)`` has equal row and column sums, so it is already a fixed point of Sinkhorn.
    """
    if n == 1:
        return torch.zeros(1, 1)
    d = PRESERVE_RES_DIAGONAL
    beta = math.log(d * (n - 1) / (1 - d))
    return beta * torch.eye(n)


class Connection(nn.Module):
    """Base of the connection modules: ``forward`` = coefficients + pre-mix, in any layout.

    Subclasses implement :meth:`coefficients`. The block's mixing ``X_next = H_res·X +
    H_postᵀ·y`` is the ``post`` submodule, so the rewritten graph calls ``<connection>.post``.
    """

    def __init__(self, n: int, channels: int, stream_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.n, self.channels, self.stream_dim = n, channels, stream_dim
        self.post = PostResMix(stream_dim, fused)

    def coefficients(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` of a token-layout stream."""
        raise NotImplementedError

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch input and mixing coefficients of stream ``X``.

        Returns:
            ``h`` (X without its stream axis), ``H_post [..., n]``, ``H_res [..., n, n]``
            (token layout: the leading dims of X other than stream and feature axes).
        """
        Xt = MF.to_token_layout(X, self.stream_dim)
        H_pre, H_post, H_res = self.coefficients(Xt)
        h = MF.pre_mix(Xt, H_pre)
        return MF.from_token_layout(h, self.stream_dim, X.dim()), H_post, H_res


class MHCConnection(Connection):
    """Manifold-constrained hyper-connection of one residual block (mHC, DeepSeek).

    Parameters (``m = n² + 2n``): ``phi [n*C, m]``, ``alpha [3]``, ``bias [m]``; all float32.

    Args:
        n: streams; channels: C; index: block position in its stream (picks the favoured
        stream at ``init="preserve"``); stream_dim: the stream axis of X (feature axis after it);
        sinkhorn_iters, eps, alpha_init, init: see :class:`mhc_fx.MHCConfig`.
        fused: compute the pre side and the mixing with the fused ops
            (``torch.ops.mhc_fx.mhc_pre`` / ``post_res``: Triton kernels on CUDA).
    """

    def __init__(
        self,
        n: int,
        channels: int,
        *,
        index: int = 0,
        stream_dim: int = -2,
        sinkhorn_iters: int = 20,
        eps: float = 1e-6,
        alpha_init: float = 0.01,
        init: str = "preserve",
        fused: bool = False,
    ) -> None:
        super().__init__(n, channels, stream_dim, fused)
        self.eps, self.fused = eps, fused
        self.sinkhorn = Sinkhorn(sinkhorn_iters)
        m = n * n + 2 * n
        self.phi = nn.Parameter(torch.zeros(n * channels, m))
        self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))
        self.bias = nn.Parameter(torch.zeros(m))
        with torch.no_grad():
            if init == "preserve":
                pre = preserve_pre_weights(n, index)
                self.bias[:n] = PRESERVE_SINGLE_LOGIT if n == 1 else _logit(pre)
                self.bias[2 * n :] = _res_logits(n).flatten()  # post logits stay 0: H_post = 1
            else:
                self.phi.normal_(0.0, PAPER_PHI_STD)

    def coefficients(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` of a token-layout stream."""
        return MF.mhc_coefficients(X, self.phi, self.alpha, self.bias, eps=self.eps, project_res=self.sinkhorn)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused:
            return super().forward(X)
        Xt = MF.to_token_layout(X, self.stream_dim)
        h, _, H_post, H_res = torch.ops.mhc_fx.mhc_pre(Xt, self.phi, self.alpha, self.bias, self.sinkhorn.iters, self.eps)
        return MF.from_token_layout(h, self.stream_dim, X.dim()), H_post, H_res

    def no_weight_decay(self) -> set[str]:
        """Static parameters (HC paper §4: no weight decay on the static mixing parts)."""
        return {"alpha", "bias"}

    def extra_repr(self) -> str:
        return f"n={self.n}, channels={self.channels}, stream_dim={self.stream_dim}, fused={self.fused}"


class DeepSeekV4Connection(Connection):
    """mHC of one residual block in DeepSeek-V4's form (:data:`mhc_fx.nn.functional.DEEPSEEK_V4`),
    with DeepSeek-V4's parameters: its ``state_dict`` loads into Hugging Face's
    ``DeepseekV4HyperConnection`` (strict) and the two compute the same function (``H_res`` here is
    their ``comb`` transposed, which their decoder layer mixes with).

    Parameters (``K = n² + 2n``): ``fn [K, n*C]`` (the projection, φᵀ), ``base [K]``, ``scale [3]``;
    float32.

    Args:
        n, channels, index, stream_dim, sinkhorn_iters, alpha_init (the scales), init: as
        :class:`MHCConnection`; eps: the RMS normalisation's epsilon (``rms_norm_eps``);
        hc_eps: the form's epsilon (``hc_eps``: ``H_pre``, the softmax start and every Sinkhorn
        denominator); fused: compute the pre side and the mixing with the fused ops in this form
        (``torch.ops.mhc_fx.mhc_pre(..., form=…)`` / ``post_res``: Triton kernels on CUDA).
    """

    def __init__(
        self,
        n: int,
        channels: int,
        *,
        index: int = 0,
        stream_dim: int = -2,
        sinkhorn_iters: int = 20,
        eps: float = 1e-6,
        hc_eps: float = MF.DEEPSEEK_V4.res_eps,
        alpha_init: float = 0.01,
        init: str = "preserve",
        fused: bool = False,
    ) -> None:
        super().__init__(n, channels, stream_dim, fused)
        self.eps, self.fused = eps, fused
        self.form = dataclasses.replace(MF.DEEPSEEK_V4, pre_eps=hc_eps, res_eps=hc_eps)
        self.sinkhorn = Sinkhorn(sinkhorn_iters, self.form)
        k = n * n + 2 * n
        self.fn = nn.Parameter(torch.zeros(k, n * channels))
        self.base = nn.Parameter(torch.zeros(k))
        self.scale = nn.Parameter(torch.full((3,), float(alpha_init)))
        with torch.no_grad():
            if init == "preserve":  # H_pre = σ(base) + hc_eps: the preserve weights exactly
                pre = preserve_pre_weights(n, index) - hc_eps
                self.base[:n] = _logit(pre.double()).float()
                self.base[2 * n :] = _res_logits(n).flatten()  # post logits stay 0: H_post = 1
            else:
                self.fn.normal_(0.0, PAPER_PHI_STD)

    def coefficients(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H_pre [..., n], H_post [..., n], H_res [..., n, n] = combᵀ)`` of a token-layout stream."""
        return MF.mhc_coefficients(X, self.fn.t(), self.scale, self.base, eps=self.eps, project_res=self.sinkhorn,
                                   form=self.form)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused:
            return super().forward(X)
        Xt = MF.to_token_layout(X, self.stream_dim)
        h, _, H_post, H_res = torch.ops.mhc_fx.mhc_pre(
            Xt, self.fn.t(), self.scale, self.base, self.sinkhorn.iters, self.eps, "auto", self.form.spec
        )
        return MF.from_token_layout(h, self.stream_dim, X.dim()), H_post, H_res

    def no_weight_decay(self) -> set[str]:
        return {"scale", "base"}

    def extra_repr(self) -> str:
        return (f"n={self.n}, channels={self.channels}, stream_dim={self.stream_dim}, form=deepseek_v4, "
                f"fused={self.fused}")


class HCConnection(Connection):
    """Hyper-connection of one residual block (HC, ByteDance), dynamic or static.

    Static parameters: ``pre_static [n]`` (A_m0), ``post_static [n]`` (B0), ``res_static [n, n]``
    (A_r0). Dynamic adds ``w_pre [C]``, ``w_res [C, n]``, ``w_post [C]`` (start at 0) and the
    scales ``s_alpha``, ``s_beta`` (start at ``alpha_init``). Initialised as HC Eq. 14, which
    equals the original residual: A_m0 = e_{index mod n}, A_r0 = I, B0 = 1.
    """

    def __init__(
        self,
        n: int,
        channels: int,
        *,
        index: int = 0,
        stream_dim: int = -2,
        dynamic: bool = True,
        eps: float = 1e-6,
        alpha_init: float = 0.01,
    ) -> None:
        super().__init__(n, channels, stream_dim)
        self.dynamic, self.eps = dynamic, eps
        self.pre_static = nn.Parameter(nn.functional.one_hot(torch.tensor(index % n), n).float())
        self.post_static = nn.Parameter(torch.ones(n))
        self.res_static = nn.Parameter(torch.eye(n))
        if dynamic:
            self.w_pre = nn.Parameter(torch.zeros(channels))
            self.w_res = nn.Parameter(torch.zeros(channels, n))
            self.w_post = nn.Parameter(torch.zeros(channels))
            self.s_alpha = nn.Parameter(torch.tensor(float(alpha_init)))
            self.s_beta = nn.Parameter(torch.tensor(float(alpha_init)))

    def coefficients(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` of a token-layout stream."""
        dyn = (self.w_pre, self.w_res, self.w_post, self.s_alpha, self.s_beta) if self.dynamic else None
        return MF.hc_coefficients(X, self.pre_static, self.post_static, self.res_static, dyn, eps=self.eps)

    def no_weight_decay(self) -> set[str]:
        """Static parameters (HC paper §4)."""
        return {"pre_static", "post_static", "res_static", "s_alpha", "s_beta"}

    def extra_repr(self) -> str:
        return f"n={self.n}, channels={self.channels}, stream_dim={self.stream_dim}, dynamic={self.dynamic}"


def post_res_mix(
    X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor, stream_dim: int, fused: bool = False
) -> torch.Tensor:
    """``X_next = H_res·X + H_postᵀ·y`` for a stream whose stream axis is ``stream_dim``.

    ``X`` e.g. ``[B, T, n, C]`` or ``[B, n, C, H, W]``; ``y`` has X's shape without the stream
    axis; coefficients are in token layout (see :meth:`MHCConnection.forward`). ``fused`` runs
    ``torch.ops.mhc_fx.post_res`` instead of the reference.
    """
    Xt = MF.to_token_layout(X, stream_dim)
    yt = MF.to_token_layout(y.unsqueeze(stream_dim), stream_dim).squeeze(-2)
    mix = torch.ops.mhc_fx.post_res if fused else MF.post_res_mix
    return MF.from_token_layout(mix(Xt, yt, H_post, H_res), stream_dim, X.dim())


class Sinkhorn(nn.Module):
    """Sinkhorn-Knopp projection :func:`~mhc_fx.nn.functional.sinkhorn` with ``iters``
    iterations, as ``form`` spells it: logits ``[..., n, n]`` → doubly stochastic ``[..., n, n]``."""

    def __init__(self, iters: int, form: MF.Form = MF.PAPER) -> None:
        super().__init__()
        self.iters, self.form = iters, form

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return MF.sinkhorn(logits, self.iters, self.form)

    def extra_repr(self) -> str:
        return f"iters={self.iters}" + ("" if self.form == MF.PAPER else f", form={self.form.name}")


class PostResMix(nn.Module):
    """``X_next = H_res·X + H_postᵀ·y`` (:func:`post_res_mix`) for streams at ``stream_dim``;
    ``fused`` runs the fused op."""

    def __init__(self, stream_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.stream_dim, self.fused = stream_dim, fused

    def forward(self, X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor) -> torch.Tensor:
        return post_res_mix(X, y, H_post, H_res, self.stream_dim, self.fused)


class StreamExpand(nn.Module):
    """Start of a stream: ``x`` copied into ``n`` streams at ``stream_dim`` (no parameters)."""

    def __init__(self, n: int, stream_dim: int) -> None:
        super().__init__()
        self.n, self.stream_dim = n, stream_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MF.expand_streams(x, self.n, self.stream_dim)

    def extra_repr(self) -> str:
        return f"n={self.n}, stream_dim={self.stream_dim}"


class DeepSeekV4Head(nn.Module):
    """End of a stream in DeepSeek-V4's form: the learned head (``MHCConfig(reduce="head")``),
    ``out = Σ_j w_j X_j`` with per-token weights
    :func:`~mhc_fx.nn.functional.head_weights`. Its ``state_dict`` (``hc_fn [n, n*C]``,
    ``hc_base [n]``, ``hc_scale [1]``, float32) loads into Hugging Face's
    ``DeepseekV4HyperHead`` and the two compute the same function.

    At init (``hc_fn = 0``, ``σ(hc_base) + hc_eps = 1/n``) it is the mean of the streams: the
    converted model keeps its function.
    """

    def __init__(
        self, n: int, channels: int, stream_dim: int, *, eps: float = 1e-6, hc_eps: float = MF.DEEPSEEK_V4.pre_eps,
        alpha_init: float = 0.01,
    ) -> None:
        super().__init__()
        self.n, self.channels, self.stream_dim, self.eps, self.hc_eps = n, channels, stream_dim, eps, hc_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * channels))
        self.hc_base = nn.Parameter(_logit(torch.full((n,), 1.0 / n, dtype=torch.float64) - hc_eps).float())
        self.hc_scale = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Xt = MF.to_token_layout(X, self.stream_dim)
        w = MF.head_weights(Xt, self.hc_fn, self.hc_base, self.hc_scale, eps=self.eps, pre_eps=self.hc_eps)
        return MF.from_token_layout(MF.pre_mix(Xt, w), self.stream_dim, X.dim())

    def no_weight_decay(self) -> set[str]:
        return {"hc_base", "hc_scale"}

    def extra_repr(self) -> str:
        return f"n={self.n}, channels={self.channels}, stream_dim={self.stream_dim}, form=deepseek_v4"


class StreamReduce(nn.Module):
    """End of a stream, or a read of it by a non-block consumer: n streams → one value.

    ``mode="mean"`` (function-preserving at init), ``"sum"`` (HC paper) or ``"learned"``
    (weights ``[n]`` starting at 1/n).
    """

    def __init__(self, n: int, stream_dim: int, mode: str = "mean") -> None:
        super().__init__()
        self.n, self.stream_dim, self.mode = n, stream_dim, mode
        if mode == "learned":
            self.weight = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return X.sum(dim=self.stream_dim)
        return MF.reduce_streams(X, self.stream_dim, self.weight if self.mode == "learned" else None)

    def no_weight_decay(self) -> set[str]:
        return {"weight"} if self.mode == "learned" else set()

    def extra_repr(self) -> str:
        return f"n={self.n}, stream_dim={self.stream_dim}, mode={self.mode!r}"

"""``MHCConfig``: every knob of a conversion, validated when it is built."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .errors import ConfigError

Method = Literal["mhc", "hc", "hc-static", "residual"]
Init = Literal["preserve", "paper"]
Reduce = Literal["mean", "sum", "learned", "head"]

METHODS = ("mhc", "hc", "hc-static", "residual")
INITS = ("preserve", "paper")
REDUCES = ("mean", "sum", "learned", "head")
#: mHC forms (:data:`mhc_fx.nn.functional.FORMS`)
FORMS = ("paper", "deepseek_v4")
MAX_STREAMS = 8


@dataclasses.dataclass(frozen=True)
class MHCConfig:
    """How :func:`mhc_fx.convert` rewrites residual connections.

    Attributes:
        n: number of residual streams (expansion rate), 1 to 8. The papers use 4.
        method: ``"mhc"`` (manifold-constrained, DeepSeek arXiv 2512.24880), ``"hc"`` (dynamic
            hyper-connections, ByteDance arXiv 2409.19606), ``"hc-static"`` (static HC) or
            ``"residual"`` (keep the plain additions; the A/B baseline: nothing is rewritten and
            ``n`` is not used).
        sinkhorn_iters: Sinkhorn-Knopp iterations ``t_max`` for mHC's ``H_res`` (paper: 20).
        eps: epsilon of mHC's RMS normalisation and of HC's LayerNorm.
        alpha_init: initial gating scalars α (mHC) and scales s_α, s_β (HC); papers: 0.01.
        init: ``"preserve"`` makes the converted model compute the original function at
            conversion time (pretrained models are not damaged); ``"paper"`` is the from-scratch
            init (mHC: φ ~ N(0, 0.02²), b = 0; HC: the paper's init, which is ``"preserve"``).
        reduce: how streams are reduced back to one value where something other than the next
            block reads them: ``"mean"``, ``"sum"`` (HC paper; not function-preserving),
            ``"learned"`` (a weighted sum whose weights start at 1/n) or ``"head"`` (mHC only:
            DeepSeek-V4's learned head, per-token weights from the streams,
            :class:`~mhc_fx.nn.DeepSeekV4Head`; the mean at init).
        feature_dim: the feature axis of the residual stream, or ``None`` to infer it per stream
            (``1`` when the first weighted op of the branch is a convolution, else ``-1``).
        fused_ops: run mHC connections through the fused ``torch.ops.mhc_fx`` ops (Triton
            kernels on CUDA, forward and backward) instead of the reference math; same
            function. On CPU they run the reference (or the interpreted kernels under
            ``TRITON_INTERPRET=1``). mHC only, either form.
        form: the form of mHC's coefficients (DESIGN §2 "Forms"): ``"paper"`` (arXiv 2512.24880)
            or ``"deepseek_v4"`` (DeepSeek-V4's, as Hugging Face ships it: connections with its
            parameters ``fn``, ``base``, ``scale``, loadable into ``DeepseekV4HyperConnection``;
            ``eps`` is its ``rms_norm_eps``, its ``hc_eps`` is 1e-6). mHC only.
    """

    n: int = 4
    method: Method = "mhc"
    sinkhorn_iters: int = 20
    eps: float = 1e-6
    alpha_init: float = 0.01
    init: Init = "preserve"
    reduce: Reduce = "mean"
    feature_dim: int | None = None
    fused_ops: bool = False
    form: str = "paper"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_STREAMS:
            raise ConfigError(f"MHCConfig.n must be an int from 1 to {MAX_STREAMS}, got {self.n!r}")
        if self.method not in METHODS:
            raise ConfigError(f"MHCConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ConfigError(f"MHCConfig.init must be one of {INITS}, got {self.init!r}")
        if self.reduce not in REDUCES:
            raise ConfigError(f"MHCConfig.reduce must be one of {REDUCES}, got {self.reduce!r}")
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise ConfigError(f"MHCConfig.sinkhorn_iters must be an int ≥ 1, got {self.sinkhorn_iters!r}")
        if not self.eps > 0:
            raise ConfigError(f"MHCConfig.eps must be > 0, got {self.eps!r}")
        if not self.alpha_init > 0:
            raise ConfigError(f"MHCConfig.alpha_init must be > 0, got {self.alpha_init!r}")
        if self.feature_dim not in (None, 1, -1):
            raise ConfigError(
                f"MHCConfig.feature_dim must be None (infer), 1 (channel-first) or -1 (feature-last), "
                f"got {self.feature_dim!r}"
            )
        if self.fused_ops and self.method != "mhc":
            raise ConfigError(
                f"MHCConfig.fused_ops=True needs method='mhc' (the fused kernels compute mHC), got {self.method!r}"
            )
        if self.form not in FORMS:
            raise ConfigError(f"MHCConfig.form must be one of {FORMS}, got {self.form!r}")
        if self.reduce == "head" and self.method != "mhc":
            raise ConfigError(
                f"MHCConfig.reduce='head' is DeepSeek-V4's learned head of mHC streams: it needs method='mhc', "
                f"got {self.method!r} (use reduce='learned' for a learned weighted sum)"
            )
        if self.form != "paper" and self.method != "mhc":
            raise ConfigError(f"MHCConfig.form={self.form!r} is a form of mHC: it needs method='mhc', got {self.method!r}")
        if self.init == "preserve" and self.reduce == "sum" and self.n > 1 and self.method != "residual":
            raise ConfigError(
                "MHCConfig.reduce='sum' multiplies the reduced stream by n, so init='preserve' cannot "
                "keep the model's function; use reduce='mean' or 'learned', or init='paper'"
            )

    @property
    def rewrites(self) -> bool:
        """Whether this method rewrites the residual additions (``"residual"`` keeps them)."""
        return self.method != "residual"

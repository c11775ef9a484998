"""Pure-torch reference math of mHC and HC — the single source of truth.

Every other implementation (Triton kernels, backend fusions, ONNX decompositions) is tested
against the functions in this file. Notation follows ``docs/math.md`` and DESIGN §2.

Layout: the residual stream of one token is ``X ∈ R^{n×C}``; tensors use the canonical layout
``[..., n, C]`` (any leading dims, e.g. ``[B, T, n, C]``). Per-token coefficients are
``H_pre [..., n]``, ``H_post [..., n]`` and ``H_res [..., n, n]``. Coefficients, Sinkhorn and
all accumulations are computed in float32 (float64 inputs stay float64, for gradcheck); the
mixing results are cast back to the stream dtype.

A residual block ``x_{l+1} = x_l + F(x_l)`` becomes::

    h      = H_pre · X                      input of the branch      [..., C]
    y      = F(h)                           the original branch      [..., C]
    X_next = H_res · X + H_postᵀ · y        next stream              [..., n, C]
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "Form",
    "PAPER",
    "DEEPSEEK_V4",
    "FORMS",
    "compute_dtype",
    "sinkhorn",
    "mhc_coefficients",
    "group_gate",
    "head_weights",
    "hc_coefficients",
    "pre_mix",
    "post_res_mix",
    "expand_streams",
    "reduce_streams",
    "to_token_layout",
    "from_token_layout",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype coefficients are computed in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Form:
    """A form of mHC: the constants and choices that tell one spelling of its coefficients from
    another (DESIGN §2 "Forms"). Everything else — the RMS-normalised projection
    ``h̃ = α_group · (v·φ) / r + b`` and the mixing — is shared.

    Attributes:
        name: what the form is called (``MHCConfig.form``).
        pre_eps: ``H_pre = σ(h̃_pre) + pre_eps``.
        softmax_start: Sinkhorn starts from the rows' softmax of the logits plus ``res_eps``
            (the first row normalisation), instead of ``exp(logits − max)``.
        res_eps: added to every Sinkhorn denominator (``M / (sum + res_eps)``).
        columns_first: each of the ``iters`` Sinkhorn pairs normalises columns, then rows (else
            rows, then columns; with ``softmax_start`` the first rows step is the softmax).
        transposed: the block mixes with the transpose of the Sinkhorn result
            (``H_res = combᵀ``: DeepSeek-V4 sums over the first axis of ``comb``).
    """

    name: str
    pre_eps: float = 0.0
    softmax_start: bool = False
    res_eps: float = 0.0
    columns_first: bool = True
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.softmax_start and self.columns_first:
            raise ValueError(f"mHC form {self.name!r}: softmax_start is the first rows step, so columns_first must be False")
        if self.res_eps and not self.softmax_start:
            raise ValueError(
                f"mHC form {self.name!r}: res_eps needs softmax_start (after an exp(logits − max) start, the shift "
                "would change the function through the epsilons)"
            )

    @property
    def spec(self) -> str:
        """The form as one string (the ``form`` argument of the fused ops): a registered form's
        name, else its fields (``name='…';pre_eps=…;…``, read back by :meth:`from_spec`)."""
        if FORMS.get(self.name) == self:
            return self.name
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @classmethod
    def from_spec(cls, spec: str) -> "Form":
        """The form :attr:`spec` describes.

        Raises:
            ValueError: for a string that names no registered form and lists no valid fields.
        """
        if spec in FORMS:
            return FORMS[spec]
        if spec not in _PARSED_SPECS:  # parsed once, eagerly (the ops check their form before compiled code reads it)
            try:
                fields = dict(item.split("=", 1) for item in spec.split(";"))
                _PARSED_SPECS[spec] = cls(**{key: ast.literal_eval(value) for key, value in fields.items()})
            except (ValueError, TypeError, SyntaxError) as error:
                raise ValueError(f"mHC form {spec!r}: not one of {sorted(FORMS)} nor a Form.spec ({error})") from None
        return _PARSED_SPECS[spec]

    def sinkhorn_axes(self, iters: int) -> list[int]:
        """The axes of the division steps that follow the start (-2 columns, -1 rows): ``iters``
        pairs in the form's order, less the first rows step where the softmax start is it."""
        pair = (-2, -1) if self.columns_first else (-1, -2)
        axes = [axis for _ in range(iters) for axis in pair]
        return axes[1:] if self.softmax_start else axes


#: The paper's form (DeepSeek-AI, arXiv 2512.24880): Sinkhorn from ``exp(logits − max)``, columns
#: then rows, no epsilon.
PAPER = Form("paper")
#: DeepSeek-V4's form (Hugging Face ``DeepseekV4HyperConnection``, ``hc_eps = 1e-6``):
#: ``H_pre = σ(·) + eps``; ``comb = softmax_rows(·) + eps``, then columns, then ``iters − 1`` times
#: rows and columns, each ``/ (sum + eps)``; the block mixes with ``combᵀ``.
DEEPSEEK_V4 = Form("deepseek_v4", pre_eps=1e-6, softmax_start=True, res_eps=1e-6, columns_first=False, transposed=True)
#: The forms by name.
FORMS = {form.name: form for form in (PAPER, DEEPSEEK_V4)}
#: Forms read from their :attr:`Form.spec` so far.
_PARSED_SPECS: dict[str, Form] = {}


def sinkhorn(logits: torch.Tensor, iters: int, form: Form = PAPER) -> torch.Tensor:
    """Sinkhorn-Knopp projection onto the doubly stochastic matrices (mHC Eq. 9), as ``form``
    spells it (the paper's by default; other forms: :func:`_sinkhorn_with_eps`).

    The paper's iteration is ``M⁽⁰⁾ = exp(logits)``, then ``iters`` times: divide by the
    column sums, then by the row sums. This computes it in the log domain, ``iters`` times::

        L ← L − logsumexp_columns(L);   L ← L − logsumexp_rows(L);      H_res = exp(L)

    (each step one ``log_softmax``), which is the same function in exact arithmetic
    (``log(M / colsum(M)) = L − LSE_col(L)``) but never divides 0 by 0: where a column of ``exp(logits − max)`` underflows to zero in
    floating point (logits spread by more than ~88 in fp32, which training reaches), the
    division form turns NaN in forward and backward, while every ``logsumexp`` here subtracts
    its own maximum. The last step normalises rows, so every row sums to 1 (forward gain 1);
    columns sum to 1 approximately. Autograd differentiates through every iteration exactly.

    Args:
        logits: ``[..., n, n]``, any float dtype (computed in float32 or float64).
        iters: ``t_max``, the number of (column, row) normalisation pairs; ≥ 1.
        form: the :class:`Form` (its Sinkhorn choices).

    Returns:
        ``[..., n, n]`` in the compute dtype, entries ≥ 0, rows summing to 1 (for the paper form).
    """
    log_m = logits.to(compute_dtype(logits.dtype))
    if form.softmax_start or form.res_eps or not form.columns_first:
        out = _sinkhorn_with_eps(log_m, iters, form)
    else:
        for _ in range(iters):
            log_m = torch.log_softmax(log_m, dim=-2)  # columns: L − logsumexp over each column
            log_m = torch.log_softmax(log_m, dim=-1)  # rows
        out = log_m.exp()
    return out.transpose(-2, -1) if form.transposed else out


def _sinkhorn_with_eps(logits: torch.Tensor, iters: int, form: Form) -> torch.Tensor:
    """The division iteration of a form with epsilons (DeepSeek-V4's): ``M`` = the rows' softmax
    plus ``res_eps`` (or ``exp(logits − max)``), then ``M / (sum + res_eps)`` along the form's
    axes, ``2·iters`` normalisations in all. With ``softmax_start`` every entry stays ≥
    ``res_eps / (n + 1)``-ish, so no sum is 0 at any logit spread (finite, as the paper form's
    log domain is)."""
    if form.softmax_start:
        m = torch.softmax(logits, dim=-1) + form.res_eps
    else:
        m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for axis in form.sinkhorn_axes(iters):
        m = m / (m.sum(dim=axis, keepdim=True) + form.res_eps)
    return m


def group_gate(alpha: torch.Tensor, n: int) -> torch.Tensor:
    """mHC's gating vector ``[n²+2n]``: ``α_pre`` on the n pre columns, ``α_post`` on the n
    post columns, ``α_res`` on the n² res columns (the column order of φ and b)."""
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])


def mhc_coefficients(
    X: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    *,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    project_res: Callable[[torch.Tensor], torch.Tensor] | None = None,
    form: Form = PAPER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC mapping coefficients (mHC Eq. 7–9, RMSNorm reordered as in §4.3.1).

    ``v = vec(X)``, ``r = sqrt(mean(v²) + eps)``, ``raw = v·φ``,
    ``h̃ = α_group · raw / r + b``; then ``H_pre = σ(h̃_pre) + pre_eps``, ``H_post = 2σ(h̃_post)``
    and ``H_res = Sinkhorn(mat(h̃_res))`` as ``form`` spells them (the paper's: ``pre_eps = 0``).
    The columns of φ and b are ordered ``[pre (n), post (n), res (n², row-major)]``.
    DeepSeek-V4 normalises first (``x̃ = v / r``, then ``x̃ · fnᵀ``): the same function with
    ``φ = fnᵀ``, ``α = scale``, ``b = base``.

    Args:
        X: ``[..., n, C]`` stream.
        phi: ``[n*C, n*n + 2n]`` projection (an RMSNorm weight, if any, is folded in).
        alpha: ``[3]`` gating scalars ``(α_pre, α_post, α_res)``.
        bias: ``[n*n + 2n]``.
        sinkhorn_iters: ``t_max``.
        eps: added to the mean square before the square root.
        project_res: computes ``Sinkhorn(·, sinkhorn_iters, form)`` instead of :func:`sinkhorn` (a
            module doing the same, so traced graphs show it as its own scope).
        form: the :class:`Form` (paper by default).

    Returns:
        ``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` in the compute dtype.
    """
    n = X.shape[-2]
    dt = compute_dtype(X.dtype)
    v = X.flatten(-2).to(dt)  # [..., nC]
    r = torch.sqrt((v * v).mean(dim=-1, keepdim=True) + eps)  # [..., 1]; v·v, not square(): ONNX Pow is slow in ORT
    raw = v @ phi.to(dt)  # [..., n²+2n]
    h = raw * group_gate(alpha.to(dt), n) / r + bias.to(dt)
    h_pre, h_post, h_res = h.split([n, n, n * n], dim=-1)
    H_pre = torch.sigmoid(h_pre) + form.pre_eps if form.pre_eps else torch.sigmoid(h_pre)
    H_post = 2.0 * torch.sigmoid(h_post)
    logits = h_res.unflatten(-1, (n, n))
    H_res = project_res(logits) if project_res is not None else sinkhorn(logits, sinkhorn_iters, form)
    return H_pre, H_post, H_res


def head_weights(
    X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
    pre_eps: float = DEEPSEEK_V4.pre_eps,
) -> torch.Tensor:
    """DeepSeek-V4's learned head (``DeepseekV4HyperHead``): per-token weights of the final
    collapse ``out = Σ_j w_j X_j`` (:func:`pre_mix` with them),
    ``w = σ(RMSNorm(vec X) · fnᵀ · scale + base) + pre_eps``.

    Args:
        X: ``[..., n, C]`` stream; fn: ``[n, n*C]``; base: ``[n]``; scale: ``[1]``.
        eps: the RMS normalisation's epsilon; pre_eps: added to the sigmoid (``hc_eps``).

    Returns:
        ``w [..., n]`` in the compute dtype.
    """
    dt = compute_dtype(X.dtype)
    v = X.flatten(-2).to(dt)
    r = torch.sqrt((v * v).mean(dim=-1, keepdim=True) + eps)
    return torch.sigmoid((v / r) @ fn.to(dt).t() * scale.to(dt) + base.to(dt)) + pre_eps


def hc_coefficients(
    X: torch.Tensor,
    pre_static: torch.Tensor,
    post_static: torch.Tensor,
    res_static: torch.Tensor,
    dynamic: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hyper-Connection coefficients (HC arXiv 2409.19606, Eq. 10–13), in mHC's H notation.

    Static HC uses the learned matrices as they are. Dynamic HC adds per-token terms computed
    from the per-stream LayerNorm ``X̄`` (no affine; its scale is absorbed by the W's)::

        A_m = s_α·tanh(X̄ W_m) + A_m0         [..., n]       (H_pre  = A_m)
        A_r = s_α·tanh(X̄ W_r) + A_r0         [..., n, n]    (H_res  = A_rᵀ)
        B   = s_β·tanh(X̄ W_β)ᵀ + B0          [..., n]       (H_post = B)

    so that ``h = A_mᵀX = H_pre·X`` and ``X_next = A_rᵀX + Bᵀy = H_res·X + H_postᵀ·y``.

    Args:
        X: ``[..., n, C]`` stream.
        pre_static: ``A_m0 [n]``; post_static: ``B0 [n]``; res_static: ``A_r0 [n, n]``.
        dynamic: ``(W_m [C], W_r [C, n], W_β [C], s_α [], s_β [])`` or ``None`` for static HC.
        eps: LayerNorm epsilon.

    Returns:
        ``(H_pre [..., n], H_post [..., n], H_res [..., n, n])`` in the compute dtype.
    """
    dt = compute_dtype(X.dtype)
    A_m, B, A_r = pre_static.to(dt), post_static.to(dt), res_static.to(dt)
    if dynamic is not None:
        W_m, W_r, W_b, s_a, s_b = (t.to(dt) for t in dynamic)
        Xn = F.layer_norm(X.to(dt), X.shape[-1:], eps=eps)  # [..., n, C]
        A_m = s_a * torch.tanh(Xn @ W_m) + A_m  # [..., n]
        A_r = s_a * torch.tanh(Xn @ W_r) + A_r  # [..., n, n]
        B = s_b * torch.tanh(Xn @ W_b) + B  # [..., n]
    else:
        lead = X.shape[:-2]
        A_m, B, A_r = A_m.expand(*lead, -1), B.expand(*lead, -1), A_r.expand(*lead, -1, -1)
    return A_m, B, A_r.transpose(-2, -1)


def pre_mix(X: torch.Tensor, H_pre: torch.Tensor) -> torch.Tensor:
    """Branch input ``h = H_pre · X``.

    Args:
        X: ``[..., n, C]``; H_pre: ``[..., n]`` (broadcastable).

    Returns:
        ``[..., C]`` in X's dtype (accumulated in the compute dtype).
    """
    dt = compute_dtype(X.dtype)
    h = (H_pre.to(dt).unsqueeze(-1) * X.to(dt)).sum(dim=-2)
    return h.to(X.dtype)


def post_res_mix(X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor) -> torch.Tensor:
    """Next stream ``X_next = H_res · X + H_postᵀ · y``.

    Args:
        X: ``[..., n, C]``; y: ``[..., C]`` branch output;
        H_post: ``[..., n]``; H_res: ``[..., n, n]`` (row i mixes into stream i).

    Returns:
        ``[..., n, C]`` in X's dtype (accumulated in the compute dtype).
    """
    dt = compute_dtype(X.dtype)
    out = H_res.to(dt) @ X.to(dt) + H_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)
    return out.to(X.dtype)


def to_token_layout(X: torch.Tensor, stream_dim: int) -> torch.Tensor:
    """Move the stream axis ``stream_dim`` and the feature axis right after it to the end.

    ``[B, n, C, H, W]`` with ``stream_dim=1`` becomes ``[B, H, W, n, C]``; ``stream_dim=-2``
    (token models, already ``[..., n, C]``) is returned as is.
    """
    d = stream_dim % X.dim()
    if d == X.dim() - 2:
        return X
    return X.movedim((d, d + 1), (-2, -1))


def from_token_layout(X: torch.Tensor, stream_dim: int, ndim: int) -> torch.Tensor:
    """Inverse of :func:`to_token_layout` for a tensor of ``ndim`` dims (``[..., n, C]`` or
    ``[..., C]``/``[..., n]`` when one trailing axis was reduced away)."""
    d = stream_dim % ndim
    if d == ndim - 2:
        return X
    if X.dim() == ndim:
        return X.movedim((-2, -1), (d, d + 1))
    return X.movedim(-1, d)


def expand_streams(x: torch.Tensor, n: int, stream_dim: int = -1) -> torch.Tensor:
    """Copy ``x`` into ``n`` identical streams along a new axis at ``stream_dim`` (the stream
    axis sits immediately before the feature axis).

    ``[..., C]`` → ``[..., n, C]`` for ``stream_dim=-2``; ``[B, C, H, W]`` → ``[B, n, C, H, W]``
    for ``stream_dim=1``. ``stream_dim`` indexes the *output*.
    """
    X = x.unsqueeze(stream_dim)
    shape = [-1] * X.dim()
    shape[stream_dim] = n
    return X.expand(shape).contiguous()


def reduce_streams(X: torch.Tensor, stream_dim: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce the n streams back to one: ``Σ_i w_i X_i`` (``weights [n]``), or the mean when
    ``weights`` is ``None``.

    Args:
        X: stream with its stream axis at ``stream_dim`` (e.g. ``[..., n, C]``).
    """
    if weights is None:
        return X.mean(dim=stream_dim)
    shape = [1] * X.dim()
    shape[stream_dim] = -1
    dt = compute_dtype(X.dtype)
    return (X.to(dt) * weights.to(dt).view(shape)).sum(dim=stream_dim).to(X.dtype)

"""Pure-torch implementations of the fused ops: what they compute where Triton does not run,
and what ONNX export decomposes them into.

The forwards compute the math of :mod:`mhc_fx.nn.functional` (the single source of truth),
spelled for the CPU: the Sinkhorn iterates are kept tokens-last (``[n, n, T]``: every step a
vectorised loop over tokens, not an n-wide reduction per token; ~6× faster compiled, ~3×
eagerly). Where Inductor compiles them, the stream mixing is a broadcast sum (:func:`mix`) and
the Sinkhorn iterations one ``scan`` (:func:`_compiled_loops`). The backwards are written out
in closed form, because autograd cannot run inside a custom op's body. The tests check
forwards against the functional reference and backwards against autograd through it. Shapes
as the kernels':
``X [T, n, C]``, ``y/h [T, C]``, ``H_pre/H_post [T, n]``, ``H_res [T, n, n]``, ``φ [nC, K]``,
``K = n² + 2n``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import torch

from ..nn import functional as MF


class SinkhornOps(NamedTuple):
    """How the CPU path computes the Sinkhorn projection and its exact gradient:
    ``forward(logits [..., n, n], iters) → H_res``, ``backward(logits, grad, iters) → ∂L/∂logits``
    (:func:`sinkhorn` and :func:`sinkhorn_backward` here; the ``mhc`` backend passes the ops
    ``mhc_fx::sinkhorn``/``sinkhorn_backward``, compiled once, when it traces the rest of the
    CPU path into a model's graph)."""

    forward: Callable[[torch.Tensor, int, str], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, int, str], torch.Tensor]


def mhc_pre(
    X: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float,
    path: str = "auto", form: str = "paper", *, sinkhorn_ops: SinkhornOps | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, H_pre, H_post, H_res)``: :func:`~mhc_fx.nn.functional.mhc_coefficients` in the
    form ``form`` (a :attr:`~mhc_fx.nn.functional.Form.spec`), then
    :func:`~mhc_fx.nn.functional.pre_mix` (``path``, where the op would run, does not change
    the function: the decompositions accept and drop it; ``sinkhorn_ops``: see
    :class:`SinkhornOps`, default :func:`sinkhorn`)."""
    project = (sinkhorn_ops or DIRECT).forward
    H_pre, H_post, H_res = MF.mhc_coefficients(
        X, phi, alpha, bias, sinkhorn_iters=iters, eps=eps, form=MF.Form.from_spec(form),
        project_res=lambda logits: project(logits, iters, form),
    )
    return MF.pre_mix(X, H_pre), H_pre, H_post, H_res


def post_res(X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``X_next = H_res·X + H_postᵀ·y`` (:func:`~mhc_fx.nn.functional.post_res_mix`)."""
    dt = MF.compute_dtype(X.dtype)
    out = mix(H_res.to(dt), X.to(dt)) + H_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)
    return out.to(X.dtype)


def mix(H: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``H @ X`` for ``H [..., n, m]``, ``X [..., m, C]`` → ``[..., n, C]``: eagerly a batched
    matmul; where Inductor compiles it, a broadcast sum (one fused loop, ~3× faster than a
    batch of tiny matmuls there, ~6× slower eagerly: it materialises ``[..., n, m, C]``)."""
    if torch.compiler.is_compiling():
        return (H.unsqueeze(-1) * X.unsqueeze(-3)).sum(dim=-2)
    return H @ X


def _log_steps(logits: torch.Tensor, iters: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The log-domain Sinkhorn iterates of ``logits [..., n, n]``
    (:func:`~mhc_fx.nn.functional.sinkhorn`), tokens last: per iteration ``(L after the column
    step, L after the row step)``, each ``[n, n, ...]``."""
    log_m = logits.movedim((-2, -1), (0, 1))
    for _ in range(iters):
        columns = torch.log_softmax(log_m, dim=0)
        log_m = torch.log_softmax(columns, dim=1)
        yield columns, log_m


def _compiled_loops(logits: torch.Tensor) -> bool:
    """Whether Inductor compiles this call (not an export) on a non-empty ``logits``: the
    Sinkhorn iterations then run as a ``scan`` (one compiled body, called ``iters`` times:
    3.8 s to compile ``mhc_pre`` or its backward instead of 6.6 / 10.7 s unrolled, ~0.3 ms more
    per call at T=2048). An empty batch runs the loop (``scan`` rejects its carry's strides)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and logits.numel() > 0


def _step(log_m: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One (column, row) step on tokens-last ``log_m [n, n, ...]`` as a ``scan`` body: the new
    carry and the step's normalised iterates ``(exp L_col, exp L_row)``."""
    columns = torch.log_softmax(log_m, dim=0)
    rows = torch.log_softmax(columns, dim=1)
    return _dense(rows), (columns.exp(), rows.exp())


def _step_only(log_m: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_step` keeping nothing but the carry (the forward needs no iterates)."""
    return _dense(torch.log_softmax(torch.log_softmax(log_m, dim=0), dim=1)), log_m.new_empty(0)


def _scanned(logits: torch.Tensor, iters: int, body: Callable) -> tuple[torch.Tensor, Any]:
    """``scan`` of ``body`` ``iters`` times from ``logits [..., n, n]`` made tokens-last:
    ``(L_T, the body's stacked outputs)``."""
    from torch._higher_order_ops.scan import scan

    return scan(body, _dense(logits.movedim((-2, -1), (0, 1))), logits.new_empty(iters, 0))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the standard contiguous strides (a ``scan`` carry must keep its
    strides, and ``contiguous()`` keeps odd strides of size-1 dims)."""
    return t.clone(memory_format=torch.contiguous_format)


def sinkhorn(logits: torch.Tensor, iters: int, form: str = "paper") -> torch.Tensor:
    """:func:`~mhc_fx.nn.functional.sinkhorn` of ``logits [..., n, n]`` (in its compute dtype)
    in the form ``form`` → dense ``[..., n, n]`` (as the ops' outputs are). The paper form is
    iterated tokens-last; other forms are the reference's division steps as they are."""
    logits = logits.to(MF.compute_dtype(logits.dtype))
    if form != MF.PAPER.name:
        return _dense(MF.sinkhorn(logits, iters, MF.Form.from_spec(form)))
    if _compiled_loops(logits):
        log_m = _scanned(logits, iters, _step_only)[0]
    else:
        for _, log_m in _log_steps(logits, iters):
            pass
    return _dense(log_m.exp().movedim((0, 1), (-2, -1)))


def post_res_pre(
    X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor,
    phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, iters: int, eps: float, path: str = "auto",
    form: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_next, h, H_pre, H_post', H_res')``: :func:`post_res`, then :func:`mhc_pre` on X_next."""
    X_next = post_res(X, y, H_post, H_res)
    return (X_next, *mhc_pre(X_next, phi, alpha, bias, iters, eps, form=form))


#: What export decomposes the forward ops into (``ExportedProgram.run_decompositions``).
DECOMPOSITIONS = {
    "mhc_pre": mhc_pre,
    "post_res": post_res,
    "post_res_pre": post_res_pre,
}


def sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, form: str = "paper") -> torch.Tensor:
    """Exact gradient of :func:`~mhc_fx.nn.functional.sinkhorn` w.r.t. ``logits [..., n, n]``
    for ``grad = ∂L/∂H_res``, through every iteration (iterates kept, then walked back).

    In the log domain a step ``L' = L − LSE(L)`` along an axis has the gradient
    ``g = g' − exp(L') · Σ_axis g'``, and ``H_res = exp(L_T)`` gives ``g_T = grad · H_res``:
    products and sums of the normalised iterates only, no division (finite wherever the
    forward is). Other forms: :func:`_division_backward`.
    """
    if form != MF.PAPER.name:
        return _division_backward(logits, grad, iters, MF.Form.from_spec(form))
    if _compiled_loops(logits):
        from torch._higher_order_ops.scan import scan

        _, (columns, rows) = _scanned(logits, iters, _step)
        g = _dense(grad.movedim((-2, -1), (0, 1)) * rows[-1])  # tokens last, as the iterates
        g, _ = scan(_step_back, g, (columns, rows), reverse=True)
    else:
        steps = [(columns.exp(), rows.exp()) for columns, rows in _log_steps(logits, iters)]
        g = grad.movedim((-2, -1), (0, 1)) * steps[-1][1]
        for step in reversed(steps):
            g = _step_back(g, step)[0]
    return g.movedim((0, 1), (-2, -1))


def _division_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, form: MF.Form) -> torch.Tensor:
    """The exact gradient of a division-form Sinkhorn (:func:`~mhc_fx.nn.functional.sinkhorn`
    with ``form``'s epsilons and start). A step ``M' = M / d``, ``d = Σ_axis M + ε``, has the
    gradient ``g = (g' − Σ_axis g'·M') / d``; the softmax start ``M⁰ = P + ε`` has
    ``g_logits = P·(g − Σ_rows g·P)``; an ``exp(logits − max)`` start (``ε = 0``: the shift
    cancels in the first normalisation) has ``g·P``."""
    logits = logits.to(MF.compute_dtype(logits.dtype))
    g = grad.to(logits.dtype).transpose(-2, -1) if form.transposed else grad.to(logits.dtype)
    if form.softmax_start:
        start = torch.softmax(logits, dim=-1)
        m = start + form.res_eps
    else:
        start = m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    steps = []  # (axis, M', d) of every division, in order
    for axis in form.sinkhorn_axes(iters):
        d = m.sum(dim=axis, keepdim=True) + form.res_eps
        m = m / d
        steps.append((axis, m, d))
    for axis, out, d in reversed(steps):
        g = (g - (g * out).sum(dim=axis, keepdim=True)) / d
    if form.softmax_start:
        return start * (g - (g * start).sum(dim=-1, keepdim=True))
    return g * start


#: The Sinkhorn of this module (traced or run as it is).
DIRECT = SinkhornOps(sinkhorn, sinkhorn_backward)


def _step_back(g: torch.Tensor, step: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient through one (column, row) step, given its normalised iterates (a ``scan``
    body, walked in reverse)."""
    columns, rows = step
    g = g - rows * g.sum(dim=1, keepdim=True)
    g = g - columns * g.sum(dim=0, keepdim=True)
    return _dense(g), g.new_empty(0)


def mhc_pre_backward(
    X: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
    dh: torch.Tensor, dH_pre: torch.Tensor, dH_post: torch.Tensor, dH_res: torch.Tensor, iters: int, eps: float,
    form: str = "paper", *, sinkhorn_ops: SinkhornOps | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dφ, dα, db)`` of :func:`mhc_pre` (formulas in :mod:`mhc_fx.kernels.pre`;
    ``form`` and ``sinkhorn_ops`` as :func:`mhc_pre`'s)."""
    T, n, C = X.shape
    dt = MF.compute_dtype(X.dtype)
    v = X.reshape(T, n * C).to(dt)
    phi, alpha, bias = phi.to(dt), alpha.to(dt), bias.to(dt)
    r = torch.sqrt(v.square().mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    hn = (v @ phi) / r  # [T, K]
    gate = MF.group_gate(alpha, n)
    ht = hn * gate + bias
    gate_pre, half = torch.sigmoid(ht[:, :n]), torch.sigmoid(ht[:, n : 2 * n])
    H_pre = gate_pre + MF.Form.from_spec(form).pre_eps
    x_dh = (X.to(dt) * dh.to(dt).unsqueeze(1)).sum(dim=-1)  # [T, n]
    d_pre = (dH_pre.to(dt) + x_dh) * gate_pre * (1 - gate_pre)
    d_post = dH_post.to(dt) * 2 * half * (1 - half)
    logits = ht[:, 2 * n :].unflatten(-1, (n, n))
    d_res = (sinkhorn_ops or DIRECT).backward(logits, dH_res.to(dt), iters, form).flatten(-2)
    dht = torch.cat([d_pre, d_post, d_res], dim=-1)
    draw = dht * gate / r
    dr = -(draw * hn).sum(dim=-1, keepdim=True)
    dv = draw @ phi.T + dr * v / (n * C * r)
    dX = dv.unflatten(-1, (n, C)) + H_pre.unsqueeze(-1) * dh.to(dt).unsqueeze(1)
    return (dX.to(X.dtype), v.T @ draw, *gate_and_bias_grads(dht, hn, n))


def gate_and_bias_grads(dht: torch.Tensor, hn: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dα [3], db [K])`` from the per-token ``dh̃`` and ``hn = raw / r`` (both ``[T, K]``):
    ``db = Σ_t dh̃``, ``dα_g = Σ_t Σ_{k∈g} dh̃·hn``."""
    prod = (dht * hn).sum(dim=0)
    return torch.stack([prod[:n].sum(), prod[n : 2 * n].sum(), prod[2 * n :].sum()]), dht.sum(dim=0)


def post_res_backward(
    X: torch.Tensor, y: torch.Tensor, H_post: torch.Tensor, H_res: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dy, dH_post, dH_res)`` of :func:`post_res` for ``grad = ∂L/∂X_next``."""
    dt = H_res.dtype
    G, Xc, yc = grad.to(dt), X.to(dt), y.to(dt)
    dX = mix(H_res.transpose(-2, -1), G)
    dy = (H_post.unsqueeze(-1) * G).sum(dim=-2)
    return dX.to(X.dtype), dy.to(y.dtype), (G * yc.unsqueeze(-2)).sum(dim=-1), mix(G, Xc.transpose(-2, -1))

"""The fused mHC ops, registered as ``torch.library`` custom ops in namespace ``mhc_fx``.

=====================================  ==========================================================
``torch.ops.mhc_fx.mhc_pre``           ``(X, φ, α, b, iters, eps) → (h, H_pre, H_post, H_res)``
                                       (``form``: any form of mHC, as its ``Form.spec``)
``torch.ops.mhc_fx.post_res``          ``(X, y, H_post, H_res) → X_next``
``torch.ops.mhc_fx.post_res_pre``      post_res of block l, then mhc_pre of block l+1 on its
                                       output: ``→ (X_next, h, H_pre, H_post, H_res)``
``…_backward``                         their gradients (ops too, so compiled graphs keep them)
``torch.ops.mhc_fx.sinkhorn``          ``(logits, iters, form) → H_res`` on CPU, compiled: the part of
                                       the CPU path the ``mhc`` backend keeps opaque when it
                                       traces the rest into a model's graph
                                       (:func:`traced_cpu_decompositions`)
=====================================  ==========================================================

Streams are ``X [..., n, C]`` (any leading dims, flattened to T tokens), ``y``/``h [..., C]``;
coefficients ``H_pre``/``H_post [..., n]``, ``H_res [..., n, n]`` in float32 (float64 for
float64 streams); ``φ [nC, n²+2n]``, ``α [3]``, ``b [n²+2n]``; 1 ≤ n ≤ 8. Stream dtypes:
float32, float16, bfloat16 (and float64, for gradcheck).

The last arguments are ``path`` and ``form``. ``form`` is the form of mHC the pre side computes
(:attr:`mhc_fx.nn.functional.Form.spec`: ``"paper"``, ``"deepseek_v4"``, or any form's fields;
DESIGN §2 "Forms"). ``path`` says where a call runs (:data:`mhc_fx.kernels.runtime.PATHS`):
``"auto"`` (the default) runs the Triton kernels on CUDA, and on CPU under
``TRITON_INTERPRET=1``, and elsewhere :mod:`mhc_fx.kernels.cpu_path`, which computes the same
function; the ``mhc`` backend pins a path per compile. The backward ops take the path their
forward resolved. Gradients are first order (no double backward).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor

from ..nn.functional import Form, compute_dtype
from . import cpu_path, runtime

MAX_STREAMS = 8

#: How an op body runs a function of :mod:`mhc_fx.kernels.cpu_path` on a CPU path:
#: ``cpu(fn, path) → callable`` (:func:`mhc_fx.kernels.runtime.reference` when the op runs;
#: :func:`_traced` when the ``mhc`` backend traces the op into a model's graph).
CpuPath = Callable[[Callable, str], Callable]


def _check_stream(X: Tensor, op: str) -> None:
    if X.dim() < 2:
        raise ValueError(f"mhc_fx.{op}: X must be [..., n, C], got shape {tuple(X.shape)}")
    if not 1 <= X.shape[-2] <= MAX_STREAMS:
        raise ValueError(f"mhc_fx.{op}: the kernels support 1 ≤ n ≤ {MAX_STREAMS} streams, got n={X.shape[-2]}")
    if X.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"mhc_fx.{op}: X must be float32, float16, bfloat16 or float64, got {X.dtype}")


def _check_pre(X: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int, form: str = "paper") -> None:
    _check_stream(X, "mhc_pre")
    Form.from_spec(form)  # a ValueError naming the registered forms
    n, C = X.shape[-2:]
    K = n * n + 2 * n
    if tuple(phi.shape) != (n * C, K):
        raise ValueError(f"mhc_fx.mhc_pre: phi must be [n*C, n*n+2n] = [{n * C}, {K}], got {tuple(phi.shape)}")
    if tuple(alpha.shape) != (3,) or tuple(bias.shape) != (K,):
        raise ValueError(
            f"mhc_fx.mhc_pre: alpha must be [3] and bias [{K}], got {tuple(alpha.shape)} and {tuple(bias.shape)}"
        )
    if iters < 1:
        raise ValueError(f"mhc_fx.mhc_pre: iters (Sinkhorn iterations) must be ≥ 1, got {iters}")


def _check_post(X: Tensor, y: Tensor, H_post: Tensor, H_res: Tensor) -> None:
    _check_stream(X, "post_res")
    lead, n = X.shape[:-2], X.shape[-2]
    expected = (tuple(lead) + X.shape[-1:], tuple(lead) + (n,), tuple(lead) + (n, n))
    got = (tuple(y.shape), tuple(H_post.shape), tuple(H_res.shape))
    if got != expected:
        raise ValueError(f"mhc_fx.post_res: y, H_post, H_res must have shapes {expected}, got {got}")


def _tokens(X: Tensor) -> Tensor:
    """``[..., n, C]`` → contiguous ``[T, n, C]``."""
    return X.reshape(-1, *X.shape[-2:]).contiguous()


def _acc(t: Tensor, like: Tensor) -> Tensor:
    """``t`` contiguous in the compute dtype of stream ``like``."""
    return t.to(compute_dtype(like.dtype)).contiguous()


def _rows(t: Tensor, trailing: int) -> Tensor:
    """Flatten all but the ``trailing`` last dims, contiguous."""
    return t.reshape(-1, *t.shape[t.dim() - trailing :]).contiguous()


def _pre_outputs(lead: torch.Size, C: int, outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h, H_pre, H_post, H_res = outs
    n = H_pre.shape[-1]
    return h.reshape(*lead, C), H_pre.reshape(*lead, n), H_post.reshape(*lead, n), H_res.reshape(*lead, n, n)


# ------------------------------------------------------------------------------- mhc_pre
@torch.library.custom_op("mhc_fx::mhc_pre", mutates_args=())
def mhc_pre(
    X: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int, eps: float, path: str = "auto",
    form: str = "paper",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mHC pre side of one block: ``(h [..., C], H_pre [..., n], H_post [..., n], H_res [..., n, n])``."""
    return _mhc_pre(X, phi, alpha, bias, iters, eps, path, form, cpu=runtime.reference)


def _mhc_pre(X, phi, alpha, bias, iters, eps, path="auto", form="paper", *, cpu: CpuPath):
    """The body of :func:`mhc_pre`; ``cpu`` picks how the CPU path runs (:data:`CpuPath`)."""
    _check_pre(X, phi, alpha, bias, iters, form)
    args = (_tokens(X), _acc(phi, X), _acc(alpha, X), _acc(bias, X), iters, eps)
    path = runtime.resolve_path(path, X)
    if path == "triton":
        from . import pre

        outs = pre.mhc_pre_fwd(*args, Form.from_spec(form))
    else:
        outs = cpu(cpu_path.mhc_pre, path)(*args, path, form)
    return _pre_outputs(X.shape[:-2], X.shape[-1], outs)


@mhc_pre.register_fake
def _pre_fake(X, phi, alpha, bias, iters, eps, path="auto", form="paper"):
    _check_pre(X, phi, alpha, bias, iters, form)
    lead, (n, C), dt = X.shape[:-2], X.shape[-2:], compute_dtype(X.dtype)
    return (X.new_empty(*lead, C), X.new_empty(*lead, n, dtype=dt), X.new_empty(*lead, n, dtype=dt),
            X.new_empty(*lead, n, n, dtype=dt))


@torch.library.custom_op("mhc_fx::mhc_pre_backward", mutates_args=())
def mhc_pre_backward(
    X: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor,
    dh: Tensor, dH_pre: Tensor, dH_post: Tensor, dH_res: Tensor, iters: int, eps: float, path: str,
    form: str = "paper",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dX, dφ, dα, db)`` of :func:`mhc_pre` for the gradients of its four outputs,
    computed on ``path`` (the one the forward resolved)."""
    return _mhc_pre_backward(X, phi, alpha, bias, dh, dH_pre, dH_post, dH_res, iters, eps, path, form, cpu=runtime.reference)


def _mhc_pre_backward(X, phi, alpha, bias, dh, dH_pre, dH_post, dH_res, iters, eps, path, form="paper", *, cpu: CpuPath):
    """The body of :func:`mhc_pre_backward` (``cpu`` as :func:`_mhc_pre`'s)."""
    _check_pre(X, phi, alpha, bias, iters, form)
    grads = (_rows(dh, 1).to(X.dtype), _acc(_rows(dH_pre, 1), X), _acc(_rows(dH_post, 1), X), _acc(_rows(dH_res, 2), X))
    args = (_tokens(X), _acc(phi, X), _acc(alpha, X), _acc(bias, X), *grads, iters, eps)
    path = runtime.resolve_path(path, X)
    if path == "triton":
        from . import pre

        dX, dphi, dalpha, dbias = pre.mhc_pre_bwd(*args, Form.from_spec(form))
    else:
        dX, dphi, dalpha, dbias = cpu(cpu_path.mhc_pre_backward, path)(*args, form)
    return dX.reshape(X.shape), dphi.to(phi.dtype), dalpha.to(alpha.dtype), dbias.to(bias.dtype)


def _dense_like(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Contiguous tensors shaped like ``tensors`` (what the ops return, whatever the inputs' strides)."""
    return tuple(t.new_empty(t.shape) for t in tensors)


@mhc_pre_backward.register_fake
def _(X, phi, alpha, bias, dh, dH_pre, dH_post, dH_res, iters, eps, path, form="paper"):
    return _dense_like(X, phi, alpha, bias)


def _pre_setup_context(ctx, inputs, output):
    X, phi, alpha, bias, iters, eps, path, form = inputs
    ctx.save_for_backward(X, phi, alpha, bias)
    ctx.iters, ctx.eps, ctx.path, ctx.form = iters, eps, runtime.resolve_path(path, X), form


def _pre_grads(X: Tensor, dh, dH_pre, dH_post, dH_res) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upstream gradients of mhc_pre's outputs, zeros where an output was not used."""
    lead, (n, C), dt = X.shape[:-2], X.shape[-2:], compute_dtype(X.dtype)
    zeros = X.new_zeros
    return (
        dh if dh is not None else zeros(*lead, C),
        dH_pre if dH_pre is not None else zeros(*lead, n, dtype=dt),
        dH_post if dH_post is not None else zeros(*lead, n, dtype=dt),
        dH_res if dH_res is not None else zeros(*lead, n, n, dtype=dt),
    )


def _pre_backward(ctx, dh, dH_pre, dH_post, dH_res):
    X, phi, alpha, bias = ctx.saved_tensors
    grads = _pre_grads(X, dh, dH_pre, dH_post, dH_res)
    dX, dphi, dalpha, dbias = torch.ops.mhc_fx.mhc_pre_backward(
        X, phi, alpha, bias, *grads, ctx.iters, ctx.eps, ctx.path, ctx.form
    )
    return dX, dphi, dalpha, dbias, None, None, None, None


mhc_pre.register_autograd(_pre_backward, setup_context=_pre_setup_context)


# ------------------------------------------------------------------------------ post_res
@torch.library.custom_op("mhc_fx::post_res", mutates_args=())
def post_res(X: Tensor, y: Tensor, H_post: Tensor, H_res: Tensor, path: str = "auto") -> Tensor:
    """Next stream ``X_next [..., n, C] = H_res·X + H_postᵀ·y``."""
    return _post_res(X, y, H_post, H_res, path, cpu=runtime.reference)


def _post_res(X, y, H_post, H_res, path="auto", *, cpu: CpuPath):
    """The body of :func:`post_res` (``cpu`` as :func:`_mhc_pre`'s)."""
    _check_post(X, y, H_post, H_res)
    args = (_tokens(X), _rows(y, 1).to(X.dtype), _acc(_rows(H_post, 1), X), _acc(_rows(H_res, 2), X))
    path = runtime.resolve_path(path, X)
    if path == "triton":
        from . import post_res as kernels

        out = kernels.post_res_fwd(*args)
    else:
        out = cpu(cpu_path.post_res, path)(*args)
    return out.reshape(X.shape)


@post_res.register_fake
def _(X, y, H_post, H_res, path="auto"):
    _check_post(X, y, H_post, H_res)
    return X.new_empty(X.shape)


@torch.library.custom_op("mhc_fx::post_res_backward", mutates_args=())
def post_res_backward(
    X: Tensor, y: Tensor, H_post: Tensor, H_res: Tensor, grad: Tensor, path: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dX, dy, dH_post, dH_res)`` of :func:`post_res` for ``grad = ∂L/∂X_next``,
    computed on ``path`` (the one the forward resolved)."""
    return _post_res_backward(X, y, H_post, H_res, grad, path, cpu=runtime.reference)


def _post_res_backward(X, y, H_post, H_res, grad, path, *, cpu: CpuPath):
    """The body of :func:`post_res_backward` (``cpu`` as :func:`_mhc_pre`'s)."""
    _check_post(X, y, H_post, H_res)
    args = (_tokens(X), _rows(y, 1).to(X.dtype), _acc(_rows(H_post, 1), X), _acc(_rows(H_res, 2), X),
            _tokens(grad).to(X.dtype))
    path = runtime.resolve_path(path, X)
    if path == "triton":
        from . import post_res as kernels

        dX, dy, dH_post, dH_res = kernels.post_res_bwd(*args)
    else:
        dX, dy, dH_post, dH_res = cpu(cpu_path.post_res_backward, path)(*args)
    return (dX.reshape(X.shape), dy.reshape(y.shape).to(y.dtype), dH_post.reshape(H_post.shape).to(H_post.dtype),
            dH_res.reshape(H_res.shape).to(H_res.dtype))


@post_res_backward.register_fake
def _(X, y, H_post, H_res, grad, path):
    return _dense_like(X, y, H_post, H_res)


def _post_setup_context(ctx, inputs, output):
    X, y, H_post, H_res, path = inputs
    ctx.save_for_backward(X, y, H_post, H_res)
    ctx.path = runtime.resolve_path(path, X)


def _post_backward(ctx, grad):
    dX, dy, dH_post, dH_res = torch.ops.mhc_fx.post_res_backward(*ctx.saved_tensors, grad, ctx.path)
    return dX, dy, dH_post, dH_res, None


post_res.register_autograd(_post_backward, setup_context=_post_setup_context)


# -------------------------------------------------------------------------- post_res_pre
@torch.library.custom_op("mhc_fx::post_res_pre", mutates_args=())
def post_res_pre(
    X: Tensor, y: Tensor, H_post: Tensor, H_res: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int, eps: float,
    path: str = "auto", form: str = "paper",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``X_next = post_res(X, y, H_post, H_res)`` and ``mhc_pre(X_next, φ, α, b)`` in one pass:
    ``(X_next, h, H_pre, H_post', H_res')`` (X_next is read from registers, not memory)."""
    return _post_res_pre(X, y, H_post, H_res, phi, alpha, bias, iters, eps, path, form, cpu=runtime.reference)


def _post_res_pre(X, y, H_post, H_res, phi, alpha, bias, iters, eps, path="auto", form="paper", *, cpu: CpuPath):
    """The body of :func:`post_res_pre` (``cpu`` as :func:`_mhc_pre`'s)."""
    _check_post(X, y, H_post, H_res)
    _check_pre(X, phi, alpha, bias, iters, form)
    post_args = (_tokens(X), _rows(y, 1).to(X.dtype), _acc(_rows(H_post, 1), X), _acc(_rows(H_res, 2), X))
    pre_args = (_acc(phi, X), _acc(alpha, X), _acc(bias, X), iters, eps)
    path = runtime.resolve_path(path, X)
    if path == "triton":
        from . import pre

        X_next, *outs = pre.post_res_pre_fwd(*post_args, *pre_args, Form.from_spec(form))
    else:
        # the two functions the other ops compile already (one compile each, shared by every block)
        X_next = cpu(cpu_path.post_res, path)(*post_args)
        outs = cpu(cpu_path.mhc_pre, path)(X_next, *pre_args, path, form)
    return (X_next.reshape(X.shape), *_pre_outputs(X.shape[:-2], X.shape[-1], tuple(outs)))


@post_res_pre.register_fake
def _(X, y, H_post, H_res, phi, alpha, bias, iters, eps, path="auto", form="paper"):
    _check_post(X, y, H_post, H_res)
    return (X.new_empty(X.shape), *_pre_fake(X, phi, alpha, bias, iters, eps, path, form))


def _post_pre_setup_context(ctx, inputs, output):
    X, y, H_post, H_res, phi, alpha, bias, iters, eps, path, form = inputs
    ctx.save_for_backward(X, y, H_post, H_res, phi, alpha, bias, output[0])
    ctx.iters, ctx.eps, ctx.path, ctx.form = iters, eps, runtime.resolve_path(path, X), form


def _post_pre_backward(ctx, dX_next, dh, dH_pre, dH_post, dH_res):
    X, y, H_post, H_res, phi, alpha, bias, X_next = ctx.saved_tensors
    grads = _pre_grads(X_next, dh, dH_pre, dH_post, dH_res)
    dXn, dphi, dalpha, dbias = torch.ops.mhc_fx.mhc_pre_backward(
        X_next, phi, alpha, bias, *grads, ctx.iters, ctx.eps, ctx.path, ctx.form
    )
    if dX_next is not None:
        dXn = dXn + dX_next
    dX, dy, dH_post_in, dH_res_in = torch.ops.mhc_fx.post_res_backward(X, y, H_post, H_res, dXn, ctx.path)
    return dX, dy, dH_post_in, dH_res_in, dphi, dalpha, dbias, None, None, None, None


post_res_pre.register_autograd(_post_pre_backward, setup_context=_post_pre_setup_context)


# ----------------------------------------------------------------------------- sinkhorn
@torch.library.custom_op("mhc_fx::sinkhorn", mutates_args=())
def sinkhorn(logits: Tensor, iters: int, form: str = "paper") -> Tensor:
    """``H_res [..., n, n] = Sinkhorn(logits [..., n, n])`` (``iters`` steps of ``form``), in the
    logits' compute dtype, on CPU tensors: :func:`mhc_fx.kernels.cpu_path.sinkhorn` compiled by
    Inductor once per shape. The piece of the CPU path that the ``mhc`` backend keeps opaque
    when it traces the rest of the fused ops into a model's graph: one compiled ``scan``
    shared by every block, where tracing it would compile the iterations once per block."""
    _check_logits(logits, iters, form)
    return runtime.reference(cpu_path.sinkhorn, "compiled_reference")(logits, iters, form)


def _check_logits(logits: Tensor, iters: int, form: str) -> None:
    Form.from_spec(form)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.device.type != "cpu":
        raise ValueError(f"mhc_fx.sinkhorn: logits must be CPU [..., n, n], got {tuple(logits.shape)} on {logits.device}")
    if iters < 1:
        raise ValueError(f"mhc_fx.sinkhorn: iters (Sinkhorn iterations) must be ≥ 1, got {iters}")


@sinkhorn.register_fake
def _(logits, iters, form="paper"):
    _check_logits(logits, iters, form)
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("mhc_fx::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(logits: Tensor, grad: Tensor, iters: int, form: str = "paper") -> Tensor:
    """``∂L/∂logits`` of :func:`sinkhorn` for ``grad = ∂L/∂H_res`` (both ``[..., n, n]``, in the
    compute dtype): :func:`mhc_fx.kernels.cpu_path.sinkhorn_backward`, compiled likewise."""
    _check_logits(logits, iters, form)
    return runtime.reference(cpu_path.sinkhorn_backward, "compiled_reference")(logits, grad, iters, form).contiguous()


@sinkhorn_backward.register_fake
def _(logits, grad, iters, form="paper"):
    _check_logits(logits, iters, form)
    return grad.new_empty(grad.shape)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, ctx.iters, ctx.form = inputs
    ctx.save_for_backward(logits)


def _sinkhorn_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    dlogits = torch.ops.mhc_fx.sinkhorn_backward(logits, grad.to(compute_dtype(logits.dtype)), ctx.iters, ctx.form)
    return dlogits.to(logits.dtype), None, None


sinkhorn.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup_context)

#: The Sinkhorn of the CPU path as the two ops above.
_SINKHORN_OPS = cpu_path.SinkhornOps(torch.ops.mhc_fx.sinkhorn, torch.ops.mhc_fx.sinkhorn_backward)


def _traced(fn: Callable, path: str) -> Callable:
    """:data:`CpuPath` of ops traced into a compiled graph: ``fn`` itself (its ATen ops join the
    graph), with the Sinkhorn iterations through the opaque :func:`sinkhorn` ops."""
    if fn in (cpu_path.mhc_pre, cpu_path.mhc_pre_backward):
        return functools.partial(fn, sinkhorn_ops=_SINKHORN_OPS)
    return fn


def _traced_decomposition(body: Callable) -> Callable:
    """The decomposition of the op whose body is ``body``: the body traced with :func:`_traced`
    for calls pinned to ``compiled_reference``; ``NotImplemented`` (the op stays: its kernels,
    or the eager reference) for any other path."""
    names = list(inspect.signature(body).parameters)[:-1]  # the op's arguments, in order (then cpu)

    def decomposition(*args, **kwargs):
        # arguments at their default may be left out of the call: the body's defaults are the op's
        arguments = dict(zip(names, args), **kwargs)
        if arguments.get("path", "auto") != "compiled_reference":
            return NotImplemented
        return body(**arguments, cpu=_traced)

    return decomposition


def traced_cpu_decompositions() -> dict:
    """``{op overload: decomposition}`` for a compiler's decomposition table (the ``mhc``
    backend's, for AOTAutograd): each forward and backward op pinned to
    ``compiled_reference`` becomes the ATen ops of its CPU path, which Inductor then compiles
    and fuses with the rest of the model's forward or backward graph (no per-call dispatch of
    a separately compiled op); the Sinkhorn iterations stay opaque (:func:`sinkhorn`). Ops on
    other paths are left as they are."""
    ops = torch.ops.mhc_fx
    bodies = {
        ops.mhc_pre: _mhc_pre, ops.mhc_pre_backward: _mhc_pre_backward, ops.post_res: _post_res,
        ops.post_res_backward: _post_res_backward, ops.post_res_pre: _post_res_pre,
    }
    return {op.default: _traced_decomposition(body) for op, body in bodies.items()}


def decompositions() -> dict:
    """``{op overload: reference function}`` for ``ExportedProgram.run_decompositions``: the
    forward ops become the reference math (the form ONNX export takes)."""
    return {getattr(torch.ops.mhc_fx, name).default: fn for name, fn in cpu_path.DECOMPOSITIONS.items()}

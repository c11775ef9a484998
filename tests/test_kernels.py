"""The fused ops' Triton kernels against the reference math, run through Triton's interpreter
on CPU (``TRITON_INTERPRET=1``, set by conftest when there is no GPU)."""

import pytest
import torch

import mhc_fx  # noqa: F401  (registers torch.ops.mhc_fx)
from mhc_fx.kernels import cpu_path as reference, runtime
from mhc_fx.nn import functional as MF

from .conftest import rel_err

needs_kernels = pytest.mark.skipif(
    not runtime.use_triton(torch.empty(0)),
    reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 with triton installed "
    "(conftest sets it when there is no GPU; on a GPU machine see test_kernels_gpu.py)",
)
ops = torch.ops.mhc_fx
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}
T = 21  # not a multiple of the 16-token block
ITERS = 4  # the interpreter pays iters²/2 Sinkhorn steps per backward; 20 is tested once below


def pre_params(n, C, dtype=torch.float32):
    K = n * n + 2 * n
    return (0.1 * torch.randn(n * C, K, dtype=dtype), 0.5 + torch.rand(3, dtype=dtype), torch.randn(K, dtype=dtype))


# Oracles: the functional reference (mhc_fx/nn/functional.py) composed as the ops compose it,
# evaluated on float64 copies of the inputs (not cpu_path, which spells the same math its own way).
def pre_reference(X, phi, alpha, bias, iters, eps, path="auto", form="paper"):
    form = MF.Form.from_spec(form)
    H_pre, H_post, H_res = MF.mhc_coefficients(X, phi, alpha, bias, sinkhorn_iters=iters, eps=eps, form=form)
    return MF.pre_mix(X, H_pre), H_pre, H_post, H_res


def post_res_pre_reference(X, y, H_post, H_res, phi, alpha, bias, iters, eps, path="auto", form="paper"):
    X_next = MF.post_res_mix(X, y, H_post, H_res)
    return (X_next, *pre_reference(X_next, phi, alpha, bias, iters, eps, form=form))


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _outputs_and_grads(fn, inputs, extra, cotangents=None):
    ins = leaves(*inputs)
    outs = fn(*ins, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, ins, [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return outs, grads, cotangents


def check_op(op, reference_fn, inputs, extra, dtype):
    """Outputs and input gradients of ``op`` vs ``reference_fn`` on float64 copies, within
    ``TOL[dtype]`` or, for float32, 4× the float32 reference's own error if that is larger
    (a sum over tokens such as dα carries fp32 rounding whoever computes it)."""
    with runtime.poisoned_outputs():
        outs, grads, cotangents = _outputs_and_grads(op, inputs, extra)
    refs, ref_grads, _ = _outputs_and_grads(reference_fn, [t.double() for t in inputs], extra, cotangents)
    own = None
    if dtype == torch.float32:
        own_outs, own_grads, _ = _outputs_and_grads(reference_fn, inputs, extra, cotangents)
        own = [rel_err(a, b) for a, b in zip(own_outs + own_grads, refs + ref_grads)]
    for k, (o, r) in enumerate(zip(outs + grads, refs + ref_grads)):
        what = f"output {k}" if k < len(outs) else f"gradient of input {k - len(outs)}"
        bound = max(TOL[dtype], 4 * own[k]) if own else TOL[dtype]
        assert not o.isnan().any(), f"{what} has unwritten (poisoned) elements"
        assert rel_err(o, r) <= bound, f"{what}: {rel_err(o, r):.2e} > {bound:.2e}"


SHAPES = [(n, C) for n in (1, 2, 4, 8) for C in (32, 96, 100)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,C", SHAPES)
def test_pre_kernel_matches_reference(n, C, dtype):
    X = torch.randn(T, n, C).to(dtype)
    before = runtime.launches.copy()
    check_op(ops.mhc_pre, pre_reference, (X, *pre_params(n, C)), (ITERS, 1e-6), dtype)
    assert runtime.launches["mhc_pre_fwd"] == before["mhc_pre_fwd"] + 1
    assert runtime.launches["mhc_pre_bwd"] == before["mhc_pre_bwd"] + 1


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,C", SHAPES)
def test_post_res_kernel_matches_reference(n, C, dtype):
    X, y = torch.randn(T, n, C).to(dtype), torch.randn(T, C).to(dtype)
    H_res = MF.sinkhorn(torch.randn(T, n, n), 3)
    check_op(ops.post_res, MF.post_res_mix, (X, y, 2 * torch.rand(T, n), H_res), (), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,C", [(1, 32), (2, 100), (4, 96), (8, 100)])
def test_fused_post_res_pre_matches_reference(n, C, dtype):
    X, y = torch.randn(T, n, C).to(dtype), torch.randn(T, C).to(dtype)
    H_res = MF.sinkhorn(torch.randn(T, n, n), 3)
    inputs = (X, y, 2 * torch.rand(T, n), H_res, *pre_params(n, C))
    before = runtime.launches["post_res_pre_fwd"]
    check_op(ops.post_res_pre, post_res_pre_reference, inputs, (ITERS, 1e-6), dtype)
    assert runtime.launches["post_res_pre_fwd"] == before + 1


#: DeepSeek-V4's form with a larger epsilon (its effect then shows above fp32 rounding), and a
#: third form (rows first, no epsilon): the kernels take any form's constants.
FORMS = [MF.DEEPSEEK_V4, MF.Form("dsv4_eps", pre_eps=0.03, softmax_start=True, res_eps=0.05, columns_first=False,
                                  transposed=True), MF.Form("rows_first", columns_first=False)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "n,path",
    # auto: the kernels, interpreted here; the compiled CPU path compiles per shape and form (~20 s each)
    [(n, "auto") for n in (1, 2, 4, 8)] + [(n, "reference") for n in (1, 2, 4, 8)] + [(4, "compiled_reference")],
)
def test_pre_side_in_other_forms_matches_the_reference(form, n, path):
    if path == "auto" and not runtime.use_triton(torch.empty(0)):
        pytest.skip("the kernels run on CPU only under TRITON_INTERPRET=1")
    C = 40
    X = torch.randn(T, n, C)
    check_op(ops.mhc_pre, pre_reference, (X, *pre_params(n, C)), (ITERS, 1e-6, path, form.spec), torch.float32)
    y, H_res = torch.randn(T, C), MF.sinkhorn(torch.randn(T, n, n), 3)
    inputs = (X, y, 2 * torch.rand(T, n), H_res, *pre_params(n, C))
    check_op(ops.post_res_pre, post_res_pre_reference, inputs, (ITERS, 1e-6, path, form.spec), torch.float32)


def test_forms_as_op_arguments_round_trip_and_bad_ones_are_named():
    for form in FORMS:
        assert MF.Form.from_spec(form.spec) == form
    assert MF.DEEPSEEK_V4.spec == "deepseek_v4"
    X = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="not one of"):
        ops.mhc_pre(X, *pre_params(4, 8), ITERS, 1e-6, "reference", "v5")


@needs_kernels
def test_sinkhorn_gradient_through_twenty_iterations():
    n, C = 4, 96
    X = torch.randn(T, n, C)
    check_op(ops.mhc_pre, pre_reference, (X, *pre_params(n, C)), (20, 1e-6), torch.float32)


@needs_kernels
def test_leading_dims_and_empty_input():
    n, C = 2, 24
    X, params = torch.randn(2, 3, 5, n, C), pre_params(n, C)
    outs = ops.mhc_pre(X, *params, ITERS, 1e-6)
    assert outs[0].shape == (2, 3, 5, C) and outs[3].shape == (2, 3, 5, n, n)
    for out, ref in zip(outs, pre_reference(X.double(), *(p.double() for p in params), ITERS, 1e-6)):
        assert rel_err(out, ref) <= 1e-5
    empty = ops.mhc_pre(torch.randn(0, n, C), *pre_params(n, C), ITERS, 1e-6)
    assert [tuple(t.shape) for t in empty] == [(0, C), (0, n), (0, n), (0, n, n)]


@pytest.mark.parametrize("tokens,n", [(0, 4), (1, 1), (1, 4)])  # empty, and size-1 dims with odd strides
def test_compiled_cpu_path_at_edge_sizes_matches_the_reference(tokens, n):
    C = 8
    X = torch.randn(tokens, n, C, requires_grad=True)
    params = tuple(p.requires_grad_() for p in pre_params(n, C))
    compiled = ops.mhc_pre(X, *params, ITERS, 1e-6, "compiled_reference")
    ref = pre_reference(X.double(), *(p.double() for p in params), ITERS, 1e-6)
    assert [t.shape for t in compiled] == [t.shape for t in ref] and all(t.is_contiguous() for t in compiled)
    assert all(rel_err(out, r) <= 1e-5 for out, r in zip(compiled, ref) if r.numel())
    upstream = [torch.randn_like(t) for t in compiled]
    grads = torch.autograd.grad(compiled, (X, *params), upstream)
    leaves64 = leaves(X.double(), *(p.double() for p in params))
    expected = torch.autograd.grad(pre_reference(*leaves64, ITERS, 1e-6), leaves64, [u.double() for u in upstream])
    assert all(rel_err(g, e) <= 1e-5 for g, e in zip(grads, expected) if e.numel() and e.abs().max() > 0)


@pytest.mark.parametrize("tokens,n", [(0, 4), (1, 1), (5, 4)])
def test_sinkhorn_op_and_its_gradient_match_the_reference(tokens, n):
    """The opaque Sinkhorn of the traced CPU path (``mhc_fx::sinkhorn``, compiled): values and
    gradient against autograd through functional.py in float64, at spread logits too."""
    logits = torch.randn(tokens, n, n) * torch.tensor([1.0, 30.0]).repeat(tokens)[:tokens, None, None]
    logits.requires_grad_()
    out = ops.sinkhorn(logits, ITERS)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, upstream)
    ref_in = logits.detach().double().requires_grad_()
    ref = MF.sinkhorn(ref_in, ITERS)
    (expected,) = torch.autograd.grad(ref, ref_in, upstream.double())
    assert out.shape == ref.shape and grad.shape == expected.shape
    if tokens:
        assert rel_err(out, ref) <= 1e-5 and rel_err(grad, expected) <= 1e-5
    torch.library.opcheck(ops.sinkhorn, (logits, ITERS))
    torch.library.opcheck(ops.sinkhorn_backward, (logits.detach(), upstream, ITERS))
    with pytest.raises(ValueError, match=r"logits must be CPU \[\.\.\., n, n\]"):
        ops.sinkhorn(torch.randn(3, 2, 4), ITERS)


def test_compiled_cpu_path_past_the_recompile_limit_warns_and_runs_eagerly():
    def row_sums(x):  # a code object of its own: no compiles of other tests count against its limit
        return torch.log_softmax(x, dim=-1).exp().sum(-1)

    compiled = runtime.CompiledReference(row_sums)
    first, other = torch.randn(3, 2, 2), torch.randn(5, 4, 4)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert rel_err(compiled(first), torch.ones(3, 2)) <= 1e-6
        with pytest.warns(UserWarning, match="CPU path of row_sums reached Dynamo's recompile limit .* run it eagerly"):
            assert rel_err(compiled(other), torch.ones(5, 4)) <= 1e-6
        assert rel_err(compiled(first), torch.ones(3, 2)) <= 1e-6  # the compiled shape still runs


@needs_kernels
@pytest.mark.parametrize("op", ["mhc_pre", "post_res", "post_res_pre"])
def test_fp64_gradcheck_through_interpreted_kernels(op):
    n, C, t = 2, 16, 5
    d = torch.float64
    X, y = torch.randn(t, n, C, dtype=d), torch.randn(t, C, dtype=d)
    H_post, H_res = 2 * torch.rand(t, n, dtype=d), MF.sinkhorn(torch.randn(t, n, n, dtype=d), 3)
    params = pre_params(n, C, d)
    args = {
        "mhc_pre": ((X, *params), (3, 1e-6)),
        "post_res": ((X, y, H_post, H_res), ()),
        "post_res_pre": ((X, y, H_post, H_res, *params), (3, 1e-6)),
    }[op]
    fn = getattr(ops, op)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, *args[1]), tuple(leaves(*args[0])), fast_mode=True)


def opcheck_cases():
    n, C, t = 2, 16, 5
    X, y = torch.randn(t, n, C), torch.randn(t, C)
    H_post, H_res = 2 * torch.rand(t, n), MF.sinkhorn(torch.randn(t, n, n), 3)
    params = pre_params(n, C)
    grads = (torch.randn(t, C), torch.randn(t, n), torch.randn(t, n), torch.randn(t, n, n))
    return {
        "mhc_pre": (ops.mhc_pre, (X, *params, 3, 1e-6)),
        "mhc_pre_backward": (ops.mhc_pre_backward, (X, *params, *grads, 3, 1e-6, "auto")),
        "post_res": (ops.post_res, (X, y, H_post, H_res)),
        "post_res_backward": (ops.post_res_backward, (X, y, H_post, H_res, torch.randn(t, n, C), "auto")),
        "post_res_pre": (ops.post_res_pre, (X, y, H_post, H_res, *params, 3, 1e-6)),
    }


@pytest.mark.parametrize("path", ["auto", "reference", "compiled_reference"])  # auto: the kernels, interpreted here
@pytest.mark.parametrize("name", ["mhc_pre", "mhc_pre_backward", "post_res", "post_res_backward", "post_res_pre"])
def test_opcheck(name, path):
    op, args = opcheck_cases()[name]
    args = (*args[:-1], path) if name.endswith("_backward") else (*args, path)
    if not name.endswith("_backward"):  # the backward ops are first order: no gradient of their own
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def mhc_layer(X, y, phi, alpha, bias, pre=ops.mhc_pre, post=ops.post_res):
    """One mHC block's mixing around a fixed branch output y (through the ops by default)."""
    h, _, H_post, H_res = pre(X, phi, alpha, bias, ITERS, 1e-6)
    return post(X, y * h, H_post, H_res)


@needs_kernels
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_compile_fullgraph_and_launch_kernels(backend):
    n, C = 4, 32
    inputs = (torch.randn(T, n, C), torch.randn(T, C), *pre_params(n, C))
    eager_in, compiled_in = leaves(*inputs), leaves(*inputs)
    eager = mhc_layer(*eager_in)
    eager_grads = torch.autograd.grad(eager.square().sum(), eager_in)
    compiled_fn = torch.compile(mhc_layer, backend=backend, fullgraph=True)
    before = runtime.launches.copy()
    out = compiled_fn(*compiled_in)
    grads = torch.autograd.grad(out.square().sum(), compiled_in)
    assert rel_err(out, eager) <= 1e-6
    for g, e in zip(grads, eager_grads):
        assert rel_err(g, e) <= 1e-6
    ref_in = leaves(*(t.double() for t in inputs))
    ref = mhc_layer(*ref_in, pre=pre_reference, post=MF.post_res_mix)
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), ref_in)):
        assert rel_err(g, r) <= 1e-5
    for kernel in ("mhc_pre_fwd", "mhc_pre_bwd", "post_res_fwd", "post_res_bwd"):
        assert runtime.launches[kernel] == before[kernel] + 1, kernel


def test_reference_backwards_match_autograd():
    """What the ops run without Triton (closed-form backwards) against autograd of functional.py."""
    n, C, t, d = 4, 24, 9, torch.float64
    X, y = torch.randn(t, n, C, dtype=d), torch.randn(t, C, dtype=d)
    params = pre_params(n, C, d)
    ins = leaves(X, *params)
    outs = pre_reference(*ins, 20, 1e-6)
    cot = [torch.randn_like(o) for o in outs]
    expected = torch.autograd.grad(outs, ins, cot)
    got = reference.mhc_pre_backward(X, *params, *cot, 20, 1e-6)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-10
    H_post, H_res = 2 * torch.rand(t, n, dtype=d), MF.sinkhorn(torch.randn(t, n, n, dtype=d), 3)
    ins = leaves(X, y, H_post, H_res)
    out = MF.post_res_mix(*ins)
    g = torch.randn_like(out)
    for a, e in zip(reference.post_res_backward(X, y, H_post, H_res, g), torch.autograd.grad(out, ins, g)):
        assert rel_err(a, e) <= 1e-12


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ops.mhc_pre(torch.randn(3, 9, 8), *pre_params(9, 8), 3, 1e-6), "1 ≤ n ≤ 8"),
        (lambda: ops.mhc_pre(torch.randn(3, 2, 8), *pre_params(2, 9), 3, 1e-6), "phi must be"),
        (lambda: ops.mhc_pre(torch.randn(3, 2, 8), *pre_params(2, 8), 0, 1e-6), "iters"),
        (lambda: ops.post_res(torch.randn(3, 2, 8), torch.randn(3, 7), torch.rand(3, 2), torch.rand(3, 2, 2)), "shapes"),
        (lambda: ops.post_res(torch.randn(3, 2, 8).int(), torch.randn(3, 8), torch.rand(3, 2), torch.rand(3, 2, 2)), "float"),
    ],
)
def test_bad_inputs_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@needs_kernels
def test_kernel_benchmark_runs_under_the_interpreter():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "kernel_speed.py"
    args = ["--interpret", "--no-compile", "--iters", "2", "--repeats", "1", "--tokens", "20", "--channels", "40"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "post_res+pre" in result.stdout and "'post_res_pre_fwd'" in result.stdout

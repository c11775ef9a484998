"""The reference math (mhc_fx.nn.functional) against its defining properties."""

import pytest
import torch

from mhc_fx.nn import HCConnection, MHCConnection, functional as MF, post_res_mix
from mhc_fx.nn.connections import PRESERVE_RES_DIAGONAL, preserve_pre_weights

from mhc_fx.kernels import cpu_path, runtime

from .conftest import rel_err


def division_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The paper's form: ``exp(L − max)``, then divide by column sums, then by row sums."""
    M = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        M = M / M.sum(-2, keepdim=True)
        M = M / M.sum(-1, keepdim=True)
    return M


def wide_logits(spread: float, n: int = 4, T: int = 8) -> torch.Tensor:
    """Logits whose columns underflow in ``exp(L − max)``: each matrix has one entry at
    ``spread`` and the rest near 0 (the shape training reaches at large learning rates)."""
    logits = torch.randn(T, n, n)
    logits[:, 0, 0] += spread
    return logits


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sinkhorn_is_doubly_stochastic(n):
    logits = 0.5 * torch.randn(256, n, n)  # the logit scale the small gating α keeps
    H = MF.sinkhorn(logits, 20)
    assert (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() <= 1e-6  # rows exact: the last step normalises rows
    assert (H.sum(-2) - 1).abs().max() <= 1e-3  # columns approximately after 20 iterations


def test_sinkhorn_column_error_shrinks_with_iterations():
    """Columns converge at a rate set by the matrix's spread: wide logits need more iterations."""
    logits = 2.0 * torch.randn(256, 4, 4, dtype=torch.float64)
    errs = [float((MF.sinkhorn(logits, t).sum(-2) - 1).abs().max()) for t in (5, 20, 200)]
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-6


def test_sinkhorn_matches_unstabilised_definition():
    logits = torch.randn(16, 4, 4, dtype=torch.float64)
    M = logits.exp()
    for _ in range(7):
        M = M / M.sum(-2, keepdim=True)
        M = M / M.sum(-1, keepdim=True)
    assert rel_err(MF.sinkhorn(logits, 7), M) <= 1e-12


def test_log_domain_equals_the_division_form_at_ordinary_logits():
    logits = 2.0 * torch.randn(64, 4, 4)
    exact = division_sinkhorn(logits.double(), 20)
    assert rel_err(MF.sinkhorn(logits.double(), 20), exact) <= 1e-12  # the same function
    assert rel_err(MF.sinkhorn(logits, 20), exact) <= 1e-6  # fp32 results unchanged within fp32


@pytest.mark.parametrize("spread", [200.0, 1e4])  # fp32 exp underflows below ~e^-103
def test_sinkhorn_stays_finite_where_the_division_form_divides_zero_by_zero(spread):
    logits = wide_logits(spread).requires_grad_()
    assert division_sinkhorn(logits, 20).isnan().any()  # what the paper's form gives here
    H = MF.sinkhorn(logits, 20)
    assert H.isfinite().all() and (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() <= 1e-5
    exact = MF.sinkhorn(logits.detach().double(), 20)
    assert rel_err(H, exact) <= 1e-5
    G = torch.randn_like(H)
    (grad,) = torch.autograd.grad(H, logits, G)
    assert grad.isfinite().all()
    closed_form = cpu_path.sinkhorn_backward(logits.detach(), G, 20)
    assert closed_form.isfinite().all() and rel_err(closed_form, grad) <= 1e-5


@pytest.mark.parametrize("path", ["reference", "auto"])  # auto: the Triton kernels, interpreted here
def test_fused_ops_stay_finite_at_logits_spread_by_1e4(path):
    if path == "auto" and not runtime.use_triton(torch.empty(0)):
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    n, C, T = 4, 16, 5
    K = n * n + 2 * n
    X = torch.randn(T, n, C, requires_grad=True)
    phi = (0.1 * torch.randn(n * C, K)).requires_grad_()
    alpha = torch.ones(3, requires_grad=True)
    bias = torch.zeros(K)
    bias[2 * n] = 1e4  # res logit (0, 0) of every token
    bias = bias.requires_grad_()
    outs = torch.ops.mhc_fx.mhc_pre(X, phi, alpha, bias, 20, 1e-6, path)
    assert all(o.isfinite().all() for o in outs)
    grads = torch.autograd.grad(outs, (X, phi, alpha, bias), [torch.randn_like(o) for o in outs])
    assert all(g.isfinite().all() for g in grads)
    X64, phi64, alpha64, bias64 = (t.detach().double() for t in (X, phi, alpha, bias))
    H_pre, H_post, H_res = MF.mhc_coefficients(X64, phi64, alpha64, bias64, sinkhorn_iters=20, eps=1e-6)
    ref = (MF.pre_mix(X64, H_pre), H_pre, H_post, H_res)
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(outs, ref))


def test_mhc_coefficients_ranges_and_rms_reorder():
    n, C = 4, 24
    X = torch.randn(2, 5, n, C, dtype=torch.float64)
    phi = torch.randn(n * C, n * n + 2 * n, dtype=torch.float64)
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    bias = torch.randn(n * n + 2 * n, dtype=torch.float64)
    H_pre, H_post, H_res = MF.mhc_coefficients(X, phi, alpha, bias, sinkhorn_iters=20, eps=1e-6)
    assert ((H_pre > 0) & (H_pre < 1)).all() and ((H_post > 0) & (H_post < 2)).all()
    # the paper's order: RMSNorm first, then the projection, then gates and bias
    v = X.flatten(-2)
    v_norm = v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-6)
    h = v_norm @ phi
    expect_pre = torch.sigmoid(alpha[0] * h[..., :n] + bias[:n])
    expect_post = 2 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + bias[n : 2 * n])
    expect_res = MF.sinkhorn((alpha[2] * h[..., 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n)), 20)
    assert rel_err(H_pre, expect_pre) <= 1e-12
    assert rel_err(H_post, expect_post) <= 1e-12
    assert rel_err(H_res, expect_res) <= 1e-12


def test_mixing_matches_einsum():
    X, y = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    H_pre, H_post, H_res = torch.rand(3, 4).double(), torch.rand(3, 4).double(), torch.rand(3, 4, 4).double()
    assert rel_err(MF.pre_mix(X, H_pre), torch.einsum("tn,tnc->tc", H_pre, X)) <= 1e-12
    expect = torch.einsum("tij,tjc->tic", H_res, X) + torch.einsum("ti,tc->tic", H_post, y)
    assert rel_err(MF.post_res_mix(X, y, H_post, H_res), expect) <= 1e-12


@pytest.mark.parametrize("n", [2, 4, 8])
def test_preserve_init_values(n):
    conn = MHCConnection(n, 8, index=5)
    X = torch.randn(7, n, 8)
    Xt = MF.to_token_layout(X, -2)
    H_pre, H_post, H_res = conn.coefficients(Xt)
    assert torch.allclose(H_pre, preserve_pre_weights(n, 5).expand(7, n), atol=1e-6)
    assert H_pre[0].argmax() == 5 % n and abs(float(H_pre[0].sum().detach()) - 1) <= 1e-6
    assert torch.allclose(H_post, torch.ones(7, n))
    assert torch.allclose(H_res.diagonal(dim1=-2, dim2=-1), torch.full((7, n), PRESERVE_RES_DIAGONAL), atol=1e-6)


@pytest.mark.parametrize("cls", [MHCConnection, HCConnection])
def test_n1_reduces_to_plain_residual(cls):
    conn = cls(1, 16)
    x = torch.randn(2, 5, 16)
    y = torch.randn(2, 5, 16)
    X = MF.expand_streams(x, 1, -2)
    h, H_post, H_res = conn(X)
    assert torch.equal(h, x)
    out = MF.reduce_streams(post_res_mix(X, y, H_post, H_res, -2), -2)
    assert rel_err(out, x + y) <= 1e-7


@pytest.mark.parametrize("cls,kw", [(MHCConnection, {}), (HCConnection, {}), (HCConnection, {"dynamic": False})])
def test_channel_first_layout_equals_token_layout(cls, kw):
    conn = cls(4, 6, init="paper", **kw) if cls is MHCConnection else cls(4, 6, **kw)
    X = torch.randn(2, 4, 6, 3, 5)  # [B, n, C, H, W]
    conn.stream_dim = 1
    h, H_post, H_res = conn(X)
    conn.stream_dim = -2
    Xt = X.permute(0, 3, 4, 1, 2)  # [B, H, W, n, C]
    h_t, H_post_t, H_res_t = conn(Xt)
    assert torch.allclose(h, h_t.permute(0, 3, 1, 2), atol=1e-6)
    y = torch.randn(2, 6, 3, 5)
    out = post_res_mix(X, y, H_post, H_res, 1)
    out_t = post_res_mix(Xt, y.permute(0, 2, 3, 1), H_post_t, H_res_t, -2)
    assert torch.allclose(out, out_t.permute(0, 3, 4, 1, 2), atol=1e-6)


@pytest.mark.parametrize("cls,kw", [(MHCConnection, {"init": "paper"}), (HCConnection, {}), (HCConnection, {"dynamic": False})])
def test_gradcheck_connection_fp64(cls, kw):
    conn = cls(3, 5, sinkhorn_iters=6, **kw) if cls is MHCConnection else cls(3, 5, **kw)
    with torch.no_grad():  # move HC off its tanh-at-zero init so every parameter matters
        for p in conn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    conn = conn.double()
    X = torch.randn(2, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in conn.named_parameters()]

    def f(X, y, *params):
        h, H_post, H_res = torch.func.functional_call(conn, dict(zip(names, params)), (X,))
        return h, post_res_mix(X, y, H_post, H_res, -2)

    inputs = (X, y, *[p.detach().clone().requires_grad_(True) for p in conn.parameters()])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_reduce_and_expand_round_trip():
    x = torch.randn(2, 5, 3, 4)
    X = MF.expand_streams(x, 4, 1)
    assert X.shape == (2, 4, 5, 3, 4)
    assert torch.equal(MF.reduce_streams(X, 1), x)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(MF.reduce_streams(X, 1, w), x, atol=1e-6)

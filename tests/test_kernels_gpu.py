"""The fused ops' Triton kernels compiled for a real GPU (bf16 included); skipped without CUDA.

Run on a GPU machine with ``python -m pytest -q tests/test_kernels_gpu.py`` (TRITON_INTERPRET
must be unset: conftest only sets it where there is no GPU).
"""

import copy

import pytest
import torch

import mhc_fx
from mhc_fx.kernels import runtime
from mhc_fx.nn import functional as MF
from mhc_fx.demo.zoo import TinyGPT

from .conftest import rel_err
from .test_kernels import check_op, mhc_layer, ops, post_res_pre_reference, pre_params, pre_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the interpreted kernels: test_kernels.py)"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
T = 1000  # not a multiple of the block


def cuda(*ts):
    return tuple(t.cuda() for t in ts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C", [(1, 100), (2, 1280), (4, 1280), (4, 2560), (8, 96)])
def test_pre_on_gpu(n, C, dtype):
    X = torch.randn(T, n, C).to(dtype)
    check_op(ops.mhc_pre, pre_reference, cuda(X, *pre_params(n, C)), (20, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C", [(1, 100), (4, 1280), (8, 96)])
def test_post_res_on_gpu(n, C, dtype):
    X, y = torch.randn(T, n, C).to(dtype), torch.randn(T, C).to(dtype)
    H_res = MF.sinkhorn(torch.randn(T, n, n), 20)
    check_op(ops.post_res, MF.post_res_mix, cuda(X, y, 2 * torch.rand(T, n), H_res), (), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_post_res_pre_on_gpu(dtype):
    n, C = 4, 1280
    X, y = torch.randn(T, n, C).to(dtype), torch.randn(T, C).to(dtype)
    H_res = MF.sinkhorn(torch.randn(T, n, n), 20)
    inputs = cuda(X, y, 2 * torch.rand(T, n), H_res, *pre_params(n, C))
    check_op(ops.post_res_pre, post_res_pre_reference, inputs, (20, 1e-6), dtype)


def test_converted_model_on_fused_ops_matches_reference_on_gpu():
    ids = torch.randint(0, 96, (4, 100), device="cuda")
    model = TinyGPT(layers=2, dim=128).cuda()
    fused = mhc_fx.convert(copy.deepcopy(model), (ids,), fused_ops=True)  # convert works in place: two copies
    reference = mhc_fx.convert(model, (ids,))
    fused.load_state_dict(reference.state_dict())
    before = runtime.launches["mhc_pre_fwd"]
    out = fused(ids)
    assert runtime.launches["mhc_pre_fwd"] == before + 4
    out.float().square().mean().backward()
    ref = reference(ids)
    ref.float().square().mean().backward()
    assert rel_err(out, ref) <= 1e-5
    grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-4, name


def test_ops_under_inductor_on_gpu():
    n, C = 4, 1280
    X, y = torch.randn(T, n, C, device="cuda", dtype=torch.bfloat16), torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
    params = cuda(*pre_params(n, C))
    out = torch.compile(mhc_layer, fullgraph=True)(X, y, *params)
    assert rel_err(out, mhc_layer(X, y, *params)) <= 1e-3
    ref = mhc_layer(X.double(), y.double(), *(p.double() for p in params), pre=pre_reference, post=MF.post_res_mix)
    assert rel_err(out, ref) <= 2e-2

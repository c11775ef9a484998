import copy
"""Converted models whose connections run on the fused ops (``MHCConfig.fused_ops``) compute
what the reference-math conversion computes, and launch the kernels (interpreted on CPU)."""

import pytest
import torch

import mhc_fx
from mhc_fx.kernels import runtime
from mhc_fx.nn import MHCConnection
from mhc_fx.demo.zoo import TinyGPT

from .conftest import rel_err
from .models import TinyResNet
from .test_kernels import needs_kernels

ITERS = 4  # Sinkhorn iterations: the interpreted backward costs iters²/2 steps per block


def _randomize_connections(model):
    """Move every mHC connection away from its function-preserving init."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MHCConnection):
                m.phi.normal_(0.0, 0.05)
                m.alpha.uniform_(0.5, 1.0)
                m.bias.add_(0.3 * torch.randn_like(m.bias))


def _pair(model, example, **config):
    reference = mhc_fx.convert(copy.deepcopy(model), example, n=4, sinkhorn_iters=ITERS, **config)
    fused = mhc_fx.convert(copy.deepcopy(model), example, n=4, sinkhorn_iters=ITERS, fused_ops=True, **config)
    _randomize_connections(reference)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@needs_kernels
def test_fused_gpt_matches_reference_conversion_with_gradients():
    ids = torch.randint(0, 96, (2, 9))  # 18 tokens: not a multiple of the kernels' block
    reference, fused = _pair(TinyGPT(layers=2, dim=32), (ids,))
    before = runtime.launches.copy()
    out = fused(ids)
    out.square().mean().backward()
    launched = runtime.launches - before
    ref = reference(ids)
    ref.square().mean().backward()
    assert rel_err(out, ref) <= 1e-5
    grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-5, name
    blocks = len(mhc_fx.report(fused).blocks)
    assert blocks == 4
    assert launched["mhc_pre_fwd"] == launched["mhc_pre_bwd"] == launched["post_res_fwd"] == blocks


@needs_kernels
def test_fused_channel_first_resnet_matches_reference_conversion():
    x = torch.randn(2, 3, 8, 8)
    reference, fused = _pair(TinyResNet().eval(), (x,))
    with torch.no_grad():
        assert rel_err(fused(x), reference(x)) <= 1e-5


def test_fused_model_exports_to_onnx_as_reference_math(tmp_path):
    pytest.importorskip("onnxruntime")
    ids = torch.randint(0, 96, (2, 9))
    reference, fused = _pair(TinyGPT(layers=1, dim=32), (ids,))
    report = mhc_fx.export_onnx(fused.eval(), (ids,), tmp_path / "fused.onnx")  # raises above 1e-4
    assert len(report.checks) == 2
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), reference.eval()(ids)) <= 1e-4

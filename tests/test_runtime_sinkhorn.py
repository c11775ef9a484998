"""The exported Sinkhorn (mhc_fx/export/runtime_sinkhorn.py): the division form below the safe
spread and the reference above it are both the reference function — against float64, eagerly
and in ONNX Runtime, at spreads just inside the bound and far outside it."""

import pytest
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT
from mhc_fx.export.runtime_sinkhorn import division_sinkhorn, runtime_sinkhorn, safe_spread
from mhc_fx.nn import functional as MF

from .conftest import rel_err

ITERS = 20


def _logits(tokens, n, spread, seed=0):
    """``[tokens, n, n]`` logits spanning ``spread`` per token: random ones, and worst-case
    tokens (one large entry per row or a permuted diagonal, the rest ``spread`` below)."""
    g = torch.Generator().manual_seed(seed)
    x = -spread * torch.rand(tokens, n, n, generator=g)
    x[:, 0, 0] = 0.0
    x[:, 0, -1] = -spread
    if tokens >= 2:
        x[1] = -spread
        x[1, torch.arange(n), torch.randperm(n, generator=g)] = 0.0  # a permutation: the far corner of the polytope
    if tokens >= 3:
        x[2] = -spread * torch.eye(n)  # one small entry per row
    return x


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_division_form_is_the_reference_inside_the_safe_spread(n):
    for spread in (1.0, 10.0, 0.999 * safe_spread(n, torch.float32)):
        x = _logits(7, n, spread)
        ref = MF.sinkhorn(x.double(), ITERS)
        out = division_sinkhorn(x, ITERS)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= 1e-5, spread
        assert rel_err(runtime_sinkhorn(x, ITERS), ref) <= 1e-5


@pytest.mark.parametrize("n", [2, 4, 8])
def test_outside_the_safe_spread_the_reference_runs(n):
    x = _logits(5, n, 300.0)
    assert not torch.isfinite(division_sinkhorn(x, ITERS)).all()  # the division form breaks here
    out = runtime_sinkhorn(x, ITERS)
    assert torch.isfinite(out).all() and rel_err(out, MF.sinkhorn(x.double(), ITERS)) <= 1e-5
    # one wide token among safe ones sends the whole call to the reference
    mixed = torch.cat([_logits(4, n, 1.0), x[:1]])
    assert torch.isfinite(runtime_sinkhorn(mixed, ITERS)).all()


class _Projection(torch.nn.Module):
    def forward(self, logits):
        return runtime_sinkhorn(logits, ITERS)


@pytest.mark.slow
def test_both_branches_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    n = 4
    path = tmp_path / "sinkhorn.onnx"
    example = _logits(3, n, 5.0)
    shapes = ({0: torch.export.Dim("tokens", min=1)},)
    ep = torch.export.export(_Projection(), (example,), dynamic_shapes=shapes, strict=False)
    torch.onnx.export(ep, dynamo=True, input_names=["logits"]).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "If" in ops
    for tokens, spread in [(1, 0.5), (300, 0.999 * safe_spread(n, torch.float32)), (1, 300.0), (300, 300.0)]:
        x = _logits(tokens, n, spread, seed=tokens)
        (out,) = session.run(None, {"logits": x.numpy()})
        assert rel_err(torch.from_numpy(out), MF.sinkhorn(x.double(), ITERS)) <= 1e-5, (tokens, spread)


@pytest.mark.slow
def test_a_converted_model_with_wide_connection_logits_exports_exactly(tmp_path):
    pytest.importorskip("onnxruntime")
    ids = torch.randint(0, 96, (2, 8))
    model = mhc_fx.convert(TinyGPT(layers=2), (ids,), n=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_mhc.bias"):
                p[8:] = 150.0 * torch.randn(16)  # H_res logits spread ~300
    report = mhc_fx.export_onnx(model, (ids,), tmp_path / "wide.onnx")
    assert all(check.max_rel <= 1e-4 for check in report.checks) and len(report.checks) == 2

"""The ``mhc`` backend fuses only what is provably the same function in forward and backward.

A paper-style mHC layer written without mhc_fx (tests/models.py ``PaperStyleMHC``) is compiled
with ``backend="mhc"`` in variants: other Sinkhorn iteration counts and the log-domain spelling
(fused: the same function), rows first (a different function), and five stop-gradients —
detached Sinkhorn output, detached H_pre, the RMS statistic from a detached X, from ``X.data``
and under ``no_grad`` (not fused: the op has no stop-gradient; the report says why). Every
variant's outputs and parameter gradients are compared with a float64 run of the same model:
within 4× eager fp32's own error (or 1e-6 of the largest gradient), and the same parameters
get gradients.
"""

import copy

import pytest
import torch

import mhc_fx
from mhc_fx.compile import backend as mhc_backend
from mhc_fx.kernels import runtime

from .conftest import rel_err
from .models import PaperStyleNet
from .test_kernels import needs_kernels


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new model instances: start from an empty Dynamo cache."""
    torch._dynamo.reset()


def _run(model, x, call=None):
    """Output and ``{name: grad}`` of one forward/backward of ``model`` (called through
    ``call``, e.g. its compiled wrapper) on ``x``."""
    model.zero_grad(set_to_none=True)
    out = (call if call is not None else model)(x)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_close_to_float64(model, x):
    """Compile ``model`` with the mhc backend; returns its fusion report after checking outputs
    and gradients against float64 (within 4× eager fp32's error) and the set of parameters
    with gradients against eager."""
    ref_out, ref_grads = _run(copy.deepcopy(model).double(), x.double())
    out, grads = _run(model, x)
    compiled = torch.compile(model, backend="mhc", fullgraph=True)
    c_out, c_grads = _run(model, x, compiled)
    assert c_grads.keys() == grads.keys() == ref_grads.keys()
    assert rel_err(c_out, ref_out) <= max(4 * rel_err(out, ref_out), 1e-6)
    # fp32 noise floor: 1e-6 of the largest gradient (a gate's gradient is a sum over tokens that
    # nearly cancels, so its own relative error is rounding noise); a stop-gradient ignored is
    # off by O(1), an inexact Sinkhorn gradient by > 1e-4
    floor = 1e-6 * max(float(g.norm()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err, eager_err = float((c_grads[name] - ref).norm()), float((grads[name] - ref).norm())
        assert err <= max(4 * eager_err, floor), f"{name}: error {err:.1e} > 4 × eager's {eager_err:.1e} (floor {floor:.1e})"
    (report,) = mhc_fx.fusion_reports(compiled)
    return report


@needs_kernels
@pytest.mark.parametrize("variant", [{"iters": 1}, {"iters": 7}, {"iters": 12, "log_domain": True}])
def test_any_sinkhorn_spelling_and_iteration_count_is_fused_exactly(variant):
    torch.manual_seed(0)
    model = PaperStyleNet(variants=[variant, {}])
    report = _assert_close_to_float64(model, torch.randn(2, 5, 24))
    assert report.counts == {"pre": 1, "post_res_pre": 1, "post_res": 1}, str(report)
    assert not report.unfused, str(report)


STOPS = {
    "sinkhorn": "stop-gradient inside the region",
    "h_pre": "stop-gradient inside the region",
    "rms": "stop-gradient inside the region",
    "data": "stop-gradient inside the region",
    "no_grad": "runs without gradients",
}


@needs_kernels
@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_stop_gradient_in_the_region_is_not_fused(stop):
    torch.manual_seed(0)
    model = PaperStyleNet(variants=[{"stop": stop}])
    report = _assert_close_to_float64(model, torch.randn(2, 5, 24))
    assert report.num_pre == 0, str(report)
    (unfused,) = report.unfused
    assert unfused.kind == "pre" and unfused.owner == "blocks.0" and STOPS[stop] in unfused.reason, str(report)


@needs_kernels
def test_rows_first_is_another_function_and_stays_unfused():
    torch.manual_seed(0)
    model = PaperStyleNet(variants=[{"rows_first": True}])
    report = _assert_close_to_float64(model, torch.randn(1, 1, 24))  # batch and length 1
    assert [u.reason for u in report.unfused] == ["Sinkhorn steps 'rcrcrcrcrcrcrcrcrcrc' are not (column, row) pairs"]


def test_two_compiled_models_keep_separate_reports():
    a, b = PaperStyleNet(variants=[{}]), PaperStyleNet(variants=[{"rows_first": True}])
    x = torch.randn(2, 3, 24)
    backend = mhc_backend.options(cross_layer=False)
    torch.compile(a, backend=backend)(x)
    torch.compile(b, backend="mhc")(x)
    (ra,), (rb,) = mhc_fx.fusion_reports(a), mhc_fx.fusion_reports(b)
    assert ra.counts == {"pre": 1, "post_res": 1} and rb.num_pre == 0
    assert backend.reports == [ra]  # the backend object keeps what it compiled, not b's graph
    assert mhc_fx.fusion_reports(torch.nn.Linear(2, 2)) == []


class BrokenInTwo(PaperStyleNet):
    """Two blocks with a graph break between them; after it ``self`` is no longer a local."""

    def forward(self, x):
        X = self.embed(x).unflatten(-1, (self.n, -1))
        first, second = self.blocks
        X = first(X)
        torch._dynamo.graph_break()
        return second(X).flatten(-2)


def test_reports_of_graphs_split_by_a_graph_break_all_belong_to_the_model():
    """The graph after a graph break is traced in the model's forward resumed, where ``self``
    is no longer a local, only the block it calls next: every graph the backend compiled is
    filed on the model all the same, oldest first, one block fused in each; a copy of the model
    has compiled nothing."""
    model = BrokenInTwo(variants=[{}, {}])
    x = torch.randn(2, 3, 24)
    backend = mhc_backend.options()
    out = torch.compile(model, backend=backend)(x)
    assert rel_err(out, model(x)) <= 1e-5
    assert len(backend.reports) == 2 and all(r.num_pre == r.num_post_res == 1 for r in backend.reports)
    assert mhc_fx.fusion_reports(model) == backend.reports
    assert mhc_fx.fusion_reports(model.blocks[1]) == backend.reports[1:]  # the resumed frame holds it
    assert mhc_fx.fusion_reports(copy.deepcopy(model)) == []


def test_cpu_path_is_pinned_per_compile(monkeypatch):
    """``compile_cpu_ops`` of one compile does not change another's ops (no process-wide
    switch), and each op's backward runs the path its forward ran. With ``cpu_ops_in_graph``
    the ops' CPU path is traced into the model's graphs: at run time only the Sinkhorn ops run
    their own compiled function."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    used = []
    original = runtime.reference
    monkeypatch.setattr(runtime, "reference", lambda fn, path: used.append((fn.__name__, path)) or original(fn, path))
    x = torch.randn(2, 3, 24)
    op_names = {"mhc_pre", "post_res", "mhc_pre_backward", "post_res_backward"}
    cases = [
        ({"compile_cpu_ops": False}, "reference", op_names),
        ({}, "compiled_reference", op_names),
        ({"cpu_ops_in_graph": True}, "compiled_reference", {"sinkhorn", "sinkhorn_backward"}),
        ({"compile_cpu_ops": False}, "reference", op_names),
    ]
    for options, path, names in cases:
        model = PaperStyleNet(variants=[{}, {}])
        compiled = torch.compile(model, backend=mhc_backend.options(**options))
        compiled(x)  # the first call traces (and, traced into the graph, calls no CPU path)
        used.clear()
        compiled(x).sum().backward()
        assert {p for _, p in used} == {path}, options
        assert {name for name, _ in used} == names, options


@needs_kernels
def test_backward_runs_the_path_its_forward_ran():
    n, C, T = 2, 16, 5
    X = torch.randn(T, n, C, requires_grad=True)
    phi, alpha, bias = 0.1 * torch.randn(n * C, n * n + 2 * n), torch.ones(3), torch.zeros(n * n + 2 * n)
    for path, kernel_launches in (("auto", 1), ("reference", 0)):  # "auto" is the interpreter here
        before = runtime.launches["mhc_pre_bwd"]
        h, *_ = torch.ops.mhc_fx.mhc_pre(X, phi, alpha, bias, 3, 1e-6, path)
        h.sum().backward()
        assert runtime.launches["mhc_pre_bwd"] == before + kernel_launches, path
    with pytest.raises(ValueError, match="path must be one of"):
        torch.ops.mhc_fx.mhc_pre(X, phi, alpha, bias, 3, 1e-6, "gpu")


def test_triton_path_without_kernels_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    X = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="path 'triton' for cpu tensors needs CUDA, or TRITON_INTERPRET=1"):
        torch.ops.mhc_fx.post_res(X, torch.randn(3, 8), torch.ones(3, 2), torch.eye(2).expand(3, 2, 2), "triton")

"""``torch.compile(model, backend="mhc")``: the mHC subgraphs of converted real models and of
an mHC layer written without mhc_fx are fused into the mhc_fx ops (the Triton kernels,
interpreted on CPU, are what runs), and outputs and gradients equal eager."""

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import mhc_fx
from mhc_fx.compile import backend as mhc_backend
from mhc_fx.errors import ConfigError
from mhc_fx.kernels import runtime
from mhc_fx.memory import saved_bytes
from mhc_fx.demo.zoo import TinyGPT

from .conftest import float_leaves, rel_err
from .models import PaperStyleNet
from .real_models import REAL_MODELS
from .test_fused_modules import ITERS, _randomize_connections
from .test_kernels import needs_kernels


def _loss(out) -> torch.Tensor:
    return sum(t.square().mean() for t in float_leaves(out))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _double(tree):
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _eager_and_compiled(model: nn.Module, oracle: nn.Module, args, kwargs, backend="mhc"):
    """Outputs and parameter gradients of ``oracle`` (``model`` in float64), of ``model`` eager
    and compiled (``fullgraph=True``), the kernel launches of the compiled step, and the
    backend's fusion report."""
    out = oracle(*_double(args), **_double(kwargs))
    _loss(out).backward()
    runs = [(float_leaves(out), _grads(oracle))]
    out = model(*args, **kwargs)
    _loss(out).backward()
    runs.append((float_leaves(out), _grads(model)))
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend=backend)
    before = runtime.launches.copy()
    out = compiled(*args, **kwargs)
    _loss(out).backward()
    launched = runtime.launches - before
    runs.append((float_leaves(out), _grads(model)))
    (report,) = mhc_fx.fusion_reports(compiled)
    return runs, launched, report


def _assert_equal(runs, tol=1e-5):
    """Compiled outputs and gradients equal eager fp32 to ``tol``, or (where eager fp32 itself
    is off the float64 oracle by more, as the gates' gradients — sums over tokens that nearly
    cancel — can be) are within 4× eager's own error of the oracle, or 1e-6 of the largest
    gradient: two fp32 sums in different orders round differently, a wrong fusion is off by
    orders of magnitude."""
    (ref_outs, ref_grads), (outs, grads), (c_outs, c_grads) = runs
    assert len(outs) == len(c_outs) > 0
    for out, ref in zip(c_outs, outs):
        assert rel_err(out, ref) <= tol
    assert ref_grads.keys() == grads.keys() == c_grads.keys() and grads
    floor = 1e-6 * max(float(g.norm()) for g in ref_grads.values())
    for name, ref in grads.items():
        exact = ref_grads[name].to(ref.dtype)
        err, eager_err = float((c_grads[name] - exact).norm()), float((ref - exact).norm())
        assert rel_err(c_grads[name], ref) <= tol or err <= max(4 * eager_err, floor), name


@needs_kernels
@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama", "hf-vit"])
def test_converted_real_model_is_fused_and_matches_eager(name):
    pytest.importorskip("transformers")
    factory, example, _ = REAL_MODELS[name]
    args, kwargs = example(2)
    # eval: the models' dropout would make eager and compiled runs differ; autograd still
    # traces the joint forward/backward graph the backend fuses
    original = factory().eval()
    model = mhc_fx.convert(copy.deepcopy(original), args, kwargs, n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    # a converted model checks its dtypes: the float64 oracle is converted from float64
    oracle = mhc_fx.convert(copy.deepcopy(original).double(), _double(args), _double(kwargs), n=4, sinkhorn_iters=ITERS)
    oracle.load_state_dict(model.state_dict())
    runs, launched, report = _eager_and_compiled(model, oracle, args, kwargs)
    _assert_equal(runs)
    blocks = mhc_fx.report(model).num_blocks
    assert report.num_pre == report.num_post_res == blocks, str(report)
    assert report.counts["post_res_pre"] == blocks - 1, str(report)  # every block after the first
    assert not report.unfused, str(report)
    # each fused pre side is reported under the connection it belongs to
    owners = {f.owner for f in report.fused if f.kind in ("pre", "post_res_pre")}
    assert owners == {b.module for b in mhc_fx.report(model).blocks}, str(report)
    # the Triton kernels (interpreted) are what ran: one launch per block and direction
    assert launched["mhc_pre_fwd"] + launched["post_res_pre_fwd"] == blocks
    assert launched["post_res_fwd"] == 1  # the last block's mixing; the others ran merged
    assert launched["mhc_pre_bwd"] == launched["post_res_bwd"] == blocks


@needs_kernels
def test_hand_written_mhc_layer_is_fused(caplog):
    model = PaperStyleNet()
    x = torch.randn(2, 5, 24)
    with caplog.at_level(logging.INFO, logger="mhc_fx.compile.backend"):
        runs, launched, report = _eager_and_compiled(model, copy.deepcopy(model).double(), (x,), {})
    _assert_equal(runs)
    # blocks 0 and 1 fused (1's pre merged with 0's mixing); block 2 normalises rows first
    assert report.counts == {"pre": 1, "post_res_pre": 1, "post_res": 1}, str(report)
    assert [u.reason for u in report.unfused] == ["Sinkhorn steps 'rcrcrcrcrcrcrcrcrcrc' are not (column, row) pairs"]
    assert report.fused[0].owner == "blocks.0"
    assert launched["mhc_pre_fwd"] == launched["post_res_pre_fwd"] == launched["post_res_fwd"] == 1
    assert "mhc fusion: 1 pre, 1 post_res, 1 post_res_pre" in caplog.text


def test_recompute_lowers_saved_bytes_with_unchanged_gradients(monkeypatch):
    """On the ops' CPU path (compiled by Inductor, ``compile_cpu_ops``): gradients equal eager's,
    and recomputation changes saved bytes, not gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # 16 interpreted blocks would be slow
    ids = torch.randint(0, 96, (2, 16))
    model = mhc_fx.convert(TinyGPT(layers=8, dim=32, heads=2), (ids,), n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    model(ids).square().mean().backward()
    eager = _grads(model)
    saved, grads = {}, {}
    for name, backend in [("mhc", "mhc"), ("mhc+recompute", mhc_backend.options(recompute=True))]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        model.zero_grad(set_to_none=True)
        compiled(ids).square().mean().backward()
        grads[name] = _grads(model)
        saved[name] = saved_bytes(compiled, ids)
    print("saved for backward (bytes):", saved)
    assert "L_r=3: 6 of 16 block streams saved" in mhc_fx.fusion_reports(model)[-1].recompute
    # exactly the 10 recomputed streams [tokens, n, C] (float32) are no longer saved, nothing else changes
    assert saved["mhc"] - saved["mhc+recompute"] == 10 * ids.numel() * 4 * 32 * 4
    assert eager.keys() == grads["mhc"].keys()
    for name, ref in eager.items():  # fp32 sums in other orders: a wrong fusion is off by O(1)
        assert rel_err(grads["mhc"][name], ref) <= 1e-4, name
    for name, ref in grads["mhc"].items():
        assert rel_err(grads["mhc+recompute"][name], ref) <= 1e-6, name


def test_backend_is_registered_and_checks_its_options():
    assert "mhc" in torch._dynamo.list_backends()
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['recomptue'\]"):
        mhc_backend.options(recomptue=True)
    assert mhc_backend.BackendOptions.parse({"compile_cpu_ops": False}).compile_cpu_ops is False
    with pytest.raises(ConfigError, match="recompute_every must be an int ≥ 1"):
        mhc_backend.BackendOptions.parse({"recompute": True, "recompute_every": 0})
    for clash in ({"recompute": True}, {"compile_cpu_ops": False}):
        with pytest.raises(ConfigError, match="cpu_ops_in_graph traces the compiled CPU path"):
            mhc_backend.options(cpu_ops_in_graph=True, **clash)


@needs_kernels
def test_graph_recompiled_with_dynamic_sizes_is_fused():
    """After a shape change Dynamo recompiles with symbolic sizes; that graph is fused as well
    (its size inputs are evaluated at their hints) and serves a third shape unchanged.
    ``dynamic=True`` from the start lifts the RMS eps to an input: reported, not fused."""
    model = mhc_fx.convert(TinyGPT(layers=1, dim=16, heads=2), (torch.randint(0, 96, (2, 8)),), n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    compiled = torch.compile(model, backend="mhc")
    for shape in [(2, 8), (3, 5), (4, 11)]:
        ids = torch.randint(0, 96, shape)
        assert rel_err(compiled(ids), model(ids)) <= 1e-5
    reports = mhc_fx.fusion_reports(model)
    assert len(reports) == 2  # static, then dynamic: the third shape reused the second graph
    assert all(r.num_pre == r.num_post_res == 2 and not r.unfused for r in reports), [str(r) for r in reports]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc", dynamic=True)
    ids = torch.randint(0, 96, (2, 8))
    assert rel_err(compiled(ids), model(ids)) <= 1e-5
    report = mhc_fx.fusion_reports(model)[-1]  # the converted call's own capture keeps eps a constant
    assert report.num_pre >= 1 and not report.unfused


def test_bfloat16_model_is_fused(monkeypatch):
    """bf16 streams (coefficients in fp32, as the reference computes them) are matched and
    fused; on CPU the ops' compiled reference path runs (the interpreter cannot do bf16)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = torch.randint(0, 96, (2, 16))
    model = mhc_fx.convert(TinyGPT(layers=2, dim=32, heads=2).bfloat16(), (ids,), n=4, sinkhorn_iters=ITERS)
    out = torch.compile(model, backend="mhc")(ids)
    (report,) = mhc_fx.fusion_reports(model)
    assert out.dtype == torch.bfloat16
    assert report.num_pre == report.num_post_res == 4 and not report.unfused, str(report)
    assert rel_err(out, model(ids)) <= 1e-2  # bf16 rounding of the streams, in other orders


@needs_kernels
def test_inference_graph_is_fused():
    """An eval-mode ``no_grad`` graph (no joint graph) is fused too: forward kernels only, and
    no recomputation plan (nothing is saved for a backward)."""
    ids = torch.randint(0, 96, (2, 8))
    model = mhc_fx.convert(TinyGPT(layers=1, dim=16, heads=2), (ids,), n=4, sinkhorn_iters=ITERS).eval()
    _randomize_connections(model)
    before = runtime.launches.copy()
    backend = mhc_backend.options(recompute=True)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(ids)
        ref = model(ids)
    launched = runtime.launches - before
    (report,) = backend.reports
    assert mhc_fx.fusion_reports(model) == [report]
    assert report.recompute is None
    assert report.num_pre == report.num_post_res == 2 and not report.unfused, str(report)
    assert launched == {"mhc_pre_fwd": 1, "post_res_pre_fwd": 1, "post_res_fwd": 1}
    assert rel_err(out, ref) <= 1e-5


def test_model_without_mhc_compiles_unchanged_and_says_so():
    gpt = TinyGPT(layers=1, dim=16, heads=2)
    ids = torch.randint(0, 96, (2, 8))
    out = torch.compile(gpt, backend="mhc")(ids)
    assert rel_err(out, gpt(ids)) <= 1e-5
    (report,) = mhc_fx.fusion_reports(gpt)
    assert not report.fused and "no Sinkhorn chain in this graph" in str(report)


def test_channel_first_blocks_are_checked_on_a_few_tokens_and_fused(monkeypatch):
    """A convolution net's stream is ``[B, n, C, H, W]``: its pre sides (token layout
    ``[B, H, W, n, C]`` inside) are cut to a few tokens for the check like a token model's —
    here 2×16×16 = 512 tokens, more than are ever checked at full size — and its mixing, which
    takes the stream into token layout through its own (equal) permute, is matched too."""
    from .models import TinyResNet

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the compiled reference path: fast enough for 512 tokens
    x = torch.randn(2, 3, 16, 16)
    model = mhc_fx.convert(TinyResNet().eval(), (x,), n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    model(x).square().mean().backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="mhc")
    out = compiled(x)
    out.square().mean().backward()
    (report,) = mhc_fx.fusion_reports(model)
    blocks = mhc_fx.report(model).num_blocks
    assert blocks == 3 and report.num_pre == report.num_post_res == blocks and not report.unfused, str(report)
    assert rel_err(out, model(x)) <= 1e-5
    assert _grads(model).keys() == eager.keys()
    for name, ref in eager.items():
        assert rel_err(_grads(model)[name], ref) <= 1e-4, name


def test_token_dims_equal_to_parameter_dims_are_fused(monkeypatch):
    """Batch × length 4 × 32 with n = 4, C = 32: the token dims equal the stream's [n, C] and
    their product the projection's n·C. Only values computed from the stream hold tokens, so
    the check cuts those to a few tokens and keeps the parameters' shapes (it used to cut
    ``φᵀ [nC, K]`` too, and fuse nothing: "its shapes do not follow the token dims")."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = torch.randint(0, 96, (4, 32))
    model = mhc_fx.convert(TinyGPT(layers=1, dim=32, heads=2), (ids,), n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    runs, _, report = _eager_and_compiled(model, copy.deepcopy(model).double(), (ids,), {})
    _assert_equal(runs)
    assert report.num_pre == report.num_post_res == 2 and not report.unfused, str(report)


def test_cpu_path_traced_into_the_graph_matches_float64(monkeypatch):
    """``cpu_ops_in_graph``: without Triton the fused ops' CPU path is traced into the model's
    forward and backward graphs (the Sinkhorn as its own compiled ops): off init, outputs and
    every gradient against the float64 model; then the same compiled model at batch 1 /
    length 1 and another shape (Dynamo's graph with symbolic sizes) against eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids = torch.randint(0, 96, (2, 16))
    model = mhc_fx.convert(TinyGPT(layers=2, dim=32, heads=2), (ids,), n=4, sinkhorn_iters=ITERS)
    _randomize_connections(model)
    used = []
    original = runtime.reference
    monkeypatch.setattr(runtime, "reference", lambda fn, path: used.append(fn.__name__) or original(fn, path))
    backend = mhc_backend.options(cpu_ops_in_graph=True)
    runs, _, report = _eager_and_compiled(model, copy.deepcopy(model).double(), (ids,), {}, backend=backend)
    _assert_equal(runs)
    assert report.num_pre == report.num_post_res == 4 and not report.unfused, str(report)
    assert set(used) == {"sinkhorn", "sinkhorn_backward"}  # no op ran its own compiled CPU path
    compiled = torch.compile(model, backend=backend)
    for shape in [(1, 1), (3, 5)]:
        ids = torch.randint(0, 96, shape)
        model.zero_grad(set_to_none=True)
        _loss(model(ids)).backward()
        eager = _grads(model)
        model.zero_grad(set_to_none=True)
        out = compiled(ids)
        _loss(out).backward()
        assert rel_err(out, model(ids)) <= 1e-5, shape
        for name, ref in eager.items():
            assert rel_err(_grads(model)[name], ref) <= 1e-4, (shape, name)
    assert all(r.num_pre == 4 and not r.unfused for r in mhc_fx.fusion_reports(model))

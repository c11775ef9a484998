"""Forms of mHC (DESIGN §2 "Forms"): the reference computes DeepSeek-V4's form as Hugging Face's
``DeepseekV4HyperConnection`` / its decoder layer do (the oracle, off init, float64 and float32),
the paper form is unchanged, and ``convert(..., form="deepseek_v4")`` produces connections whose
state dicts load into DeepSeek-V4's module and compute its function."""

import copy
import dataclasses

import pytest
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT
from mhc_fx.nn import DeepSeekV4Connection, DeepSeekV4Head
from mhc_fx.nn import functional as MF

from .conftest import rel_err

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")


def _hf_connection(n, channels, iters=20, hc_eps=1e-6, seed=0):
    """Hugging Face's DeepseekV4HyperConnection with random (off-init) parameters."""
    config = transformers.DeepseekV4Config(hidden_size=channels, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=hc_eps)
    module = modeling.DeepseekV4HyperConnection(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.fn.copy_(0.5 * torch.randn(module.fn.shape, generator=g))
        module.base.copy_(torch.randn(module.base.shape, generator=g))
        module.scale.copy_(1.0 + 0.5 * torch.rand(3, generator=g))
    return module


def _hf_block(hf, X, y):
    """DeepseekV4DecoderLayer's mixing around one connection: ``(collapsed, X_next)``."""
    post, comb, collapsed = hf(X)
    X_next = post.to(X.dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(X.dtype).transpose(-1, -2), X)
    return collapsed, X_next


@pytest.mark.parametrize("n", [1, 2, 4, 8])
# Hugging Face computes the coefficients in float32 whatever the stream dtype (``.float()``): a
# float64 stream is compared to float32 rounding too
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_deepseek_v4_form_is_hugging_faces_function(n, dtype, tol):
    channels = 24
    hf = _hf_connection(n, channels).to(dtype)
    ours = DeepSeekV4Connection(n, channels, eps=hf.input_norm.variance_epsilon).to(dtype)
    ours.load_state_dict(hf.state_dict())  # strict: the same parameters, named and shaped alike
    X = torch.randn(2, 5, n, channels, dtype=dtype, requires_grad=True)
    y = torch.randn(2, 5, channels, dtype=dtype)
    h, H_post, H_res = ours(X)
    collapsed, X_next = _hf_block(hf, X, y)
    assert rel_err(h, collapsed) <= tol
    assert rel_err(MF.post_res_mix(X, y, H_post, H_res), X_next) <= tol
    # gradients of both with respect to the stream and the parameters
    g = torch.randn_like(X_next)
    ours_grads = torch.autograd.grad((MF.post_res_mix(X, y, H_post, H_res) * g).sum() + h.sum(), [X, *ours.parameters()])
    hf_grads = torch.autograd.grad((X_next * g).sum() + collapsed.sum(), [X, *hf.parameters()])
    for a, b in zip(ours_grads, hf_grads):
        assert rel_err(a, b) <= 10 * tol


def test_deepseek_v4_sinkhorn_is_finite_at_any_spread_and_the_paper_form_is_unchanged():
    logits = 300.0 * torch.randn(6, 4, 4)
    out = MF.sinkhorn(logits, 20, MF.DEEPSEEK_V4)
    assert torch.isfinite(out).all() and (out >= 0).all()
    # the paper form: the log-domain iteration as it was (the default)
    log_m = logits.double()
    for _ in range(20):
        log_m = torch.log_softmax(torch.log_softmax(log_m, dim=-2), dim=-1)
    assert torch.equal(MF.sinkhorn(logits.double(), 20), log_m.exp())
    # without its epsilons, DeepSeek-V4's projection is the paper's on the transposed logits
    no_eps = dataclasses.replace(MF.DEEPSEEK_V4, pre_eps=0.0, res_eps=0.0)
    small = torch.randn(6, 4, 4, dtype=torch.float64)
    assert rel_err(MF.sinkhorn(small, 20, no_eps), MF.sinkhorn(small.transpose(-2, -1), 20)) <= 1e-12


def test_a_third_form_is_a_few_lines():
    rows_first = MF.Form("rows_first", columns_first=False)
    out = MF.sinkhorn(torch.randn(3, 4, 4, dtype=torch.float64), 30, rows_first)
    assert rel_err(out.sum(-2), torch.ones(3, 4, dtype=torch.float64)) <= 1e-12  # ends on columns
    with pytest.raises(ValueError, match="columns_first"):
        MF.Form("bad", softmax_start=True)


def test_convert_produces_the_deepseek_v4_form():
    ids = torch.randint(0, 96, (2, 8))
    original = TinyGPT(layers=2).eval()
    config = mhc_fx.MHCConfig(n=4, form="deepseek_v4")
    model = mhc_fx.convert(copy.deepcopy(original), (ids,), config=config).eval()
    connections = {name: m for name, m in model.named_modules() if isinstance(m, DeepSeekV4Connection)}
    assert len(connections) == mhc_fx.report(model).num_blocks == 4
    other = torch.randint(0, 96, (3, 5))
    with torch.no_grad():  # function-preserving at init (to hc_eps per block)
        assert rel_err(model(other), original(other)) <= 1e-4
    # off init, every connection is Hugging Face's module with the same state dict
    torch.manual_seed(1)
    with torch.no_grad():
        for m in connections.values():
            m.fn.normal_(0.0, 0.3)
            m.base.add_(0.5 * torch.randn_like(m.base))
    for name, m in connections.items():
        hf = _hf_connection(4, m.channels)
        hf.load_state_dict(m.state_dict())
        X, y = torch.randn(2, 3, 4, m.channels), torch.randn(2, 3, m.channels)
        h, H_post, H_res = m(X)
        collapsed, X_next = _hf_block(hf, X, y)
        assert rel_err(h, collapsed) <= 1e-5 and rel_err(MF.post_res_mix(X, y, H_post, H_res), X_next) <= 1e-5, name


def test_the_form_is_checked():
    with pytest.raises(mhc_fx.ConfigError, match="form must be one of"):
        mhc_fx.MHCConfig(form="v5")
    with pytest.raises(mhc_fx.ConfigError, match="method='mhc'"):
        mhc_fx.MHCConfig(method="hc", form="deepseek_v4")


def test_deepseek_v4_form_on_the_fused_ops_is_the_reference_conversion():
    """fused_ops=True runs the DeepSeek-V4 form on the fused ops (the Triton kernels, interpreted
    here): the same outputs and parameter gradients as the reference conversion, off init."""
    ids = torch.randint(0, 96, (2, 8))
    base = TinyGPT(layers=2)
    torch.manual_seed(3)
    reference = mhc_fx.convert(copy.deepcopy(base), (ids,), config=mhc_fx.MHCConfig(n=4, form="deepseek_v4"))
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, DeepSeekV4Connection):
                m.fn.normal_(0.0, 0.3)
                m.base.add_(0.5 * torch.randn_like(m.base))
    fused = mhc_fx.convert(copy.deepcopy(base), (ids,), config=mhc_fx.MHCConfig(n=4, form="deepseek_v4", fused_ops=True))
    fused.load_state_dict(reference.state_dict())
    assert all(m.fused for m in fused.modules() if isinstance(m, DeepSeekV4Connection))
    outs = []
    for model in (reference, fused):
        model.zero_grad()
        out = model(ids)
        out.square().mean().backward()
        outs.append((out, {k: p.grad for k, p in model.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) <= 1e-5
    for k, g in outs[0][1].items():
        assert rel_err(outs[1][1][k], g) <= 1e-4, k


@pytest.mark.slow
def test_the_form_survives_save_load_and_onnx(tmp_path):
    """The form and its head travel, off init: a saved folder loads back into the same modules and
    function; ONNX export (checked in ONNX Runtime by export_onnx itself, on two shapes) matches."""
    pytest.importorskip("onnxruntime")
    from mhc_fx.pretrained import save

    ids = torch.randint(0, 96, (2, 8))
    config = mhc_fx.MHCConfig(n=2, form="deepseek_v4", reduce="head")
    model = mhc_fx.convert(TinyGPT(layers=2), (ids,), config=config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".fn", ".base", ".hc_fn", ".hc_base")):
                p.add_(0.3 * torch.randn_like(p))
    save(model, tmp_path / "saved", "mhc_fx.demo.zoo:TinyGPT")
    loaded = mhc_fx.from_pretrained(tmp_path / "saved", model=lambda: TinyGPT(layers=2))
    kinds = [type(m) for m in loaded.modules() if isinstance(m, (DeepSeekV4Connection, DeepSeekV4Head))]
    assert DeepSeekV4Connection in kinds and DeepSeekV4Head in kinds
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    report = mhc_fx.export_onnx(model, (ids,), tmp_path / "dsv4.onnx")
    assert len(report.checks) == 2 and all(c.max_rel <= 1e-4 for c in report.checks)


def test_head_is_hugging_faces_and_keeps_the_function_at_init():
    """reduce="head": DeepSeek-V4's learned head, whose state dict loads into Hugging Face's
    DeepseekV4HyperHead (the oracle, off init); at init the converted model keeps its function."""
    ids = torch.randint(0, 96, (2, 8))
    original = TinyGPT(layers=2).eval()
    config = mhc_fx.MHCConfig(n=4, form="deepseek_v4", reduce="head")
    model = mhc_fx.convert(copy.deepcopy(original), (ids,), config=config).eval()
    heads = [m for m in model.modules() if isinstance(m, DeepSeekV4Head)]
    assert heads
    other = torch.randint(0, 96, (3, 5))
    with torch.no_grad():
        assert rel_err(model(other), original(other)) <= 1e-4
    hf_config = transformers.DeepseekV4Config(hidden_size=heads[0].channels, hc_mult=4, rms_norm_eps=config.eps)
    hf = modeling.DeepseekV4HyperHead(hf_config)
    torch.manual_seed(2)
    with torch.no_grad():
        heads[0].hc_fn.normal_(0.0, 0.3)
        heads[0].hc_base.add_(torch.randn(4))
        heads[0].hc_scale.fill_(1.3)
    hf.load_state_dict(heads[0].state_dict())  # strict: the same names and shapes
    X = torch.randn(2, 3, 4, heads[0].channels, dtype=torch.float64, requires_grad=True)
    ours, theirs = heads[0].double()(X), hf.double()(X)
    assert rel_err(ours, theirs) <= 1e-6  # Hugging Face computes the weights in float32
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * g).sum(), [X, *heads[0].parameters()]),
                    torch.autograd.grad((theirs * g).sum(), [X, *hf.parameters()])):
        assert rel_err(a, b) <= 1e-5
    with pytest.raises(mhc_fx.ConfigError, match="reduce='head'"):
        mhc_fx.MHCConfig(method="hc", reduce="head")


"""Conversion of real Hugging Face, timm and torch.nn models preserves their function."""

import pytest
import torch

import mhc_fx

from .conftest import float_leaves, rel_err
from .real_models import REAL_MODELS

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
pytest.importorskip("timm")

CONFIGS = [(4, "mhc"), (4, "hc"), (4, "hc-static"), (2, "mhc"), (1, "mhc")]


@pytest.mark.parametrize("n,method", CONFIGS, ids=[f"{m}-n{n}" for n, m in CONFIGS])
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_function_preserved(name, n, method):
    factory, example, residuals = REAL_MODELS[name]
    model = factory().eval()
    args, kwargs = example(2)
    converted = mhc_fx.convert(model, args, kwargs, n=n, method=method)
    assert mhc_fx.report(converted).num_blocks == residuals, str(mhc_fx.report(converted))
    converted.eval()
    args, kwargs = example(3)  # a batch size other than the example's
    with torch.no_grad():
        outs, refs = float_leaves(converted(*args, **kwargs)), float_leaves(model(*args, **kwargs))
    assert len(outs) == len(refs) > 0
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) <= 1e-5


def test_hf_output_structure_is_kept():
    factory, example, _ = REAL_MODELS["hf-gpt2"]
    model = factory()
    args, kwargs = example(2)
    out = mhc_fx.convert(model, args, kwargs)(*args, **kwargs)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions" and out.logits.shape == (2, 12, 128)


def test_llama_rotary_mask_and_norm_adds_are_left_alone():
    factory, example, _ = REAL_MODELS["hf-llama"]
    args, kwargs = example(2)
    report = mhc_fx.find_residuals(factory(), args, kwargs)
    assert report.num_blocks == 4
    assert [b.name for b in report.blocks] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"
    ]
    # rotary embedding adds (q·cos + rot(q)·sin) are seen and left alone with a reason
    assert len(report.skipped) >= 4 and all(s.reason for s in report.skipped)

import copy
"""Conversion of hand-built models, one per residual shape."""

import pytest
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT

from . import models
from .conftest import rel_err

METHODS = ["mhc", "hc", "hc-static"]

# (factory, example input builder, converted blocks, streams)
CASES = {
    "pre_norm": (lambda: TinyGPT(layers=3), lambda b: torch.randint(0, 96, (b, 12)), 6, 1),
    "post_norm": (models.PostNorm, lambda b: torch.randn(b, 7, 16), 3, 1),
    "branch_first_and_spellings": (models.BranchFirst, lambda b: torch.randn(b, 7, 16), 3, 1),
    "in_place": (models.InPlace, lambda b: torch.randn(b, 7, 16), 3, 1),
    "resnet_projection": (models.TinyResNet, lambda b: torch.randn(b, 3, 8, 8), 3, 2),
    "nested": (models.Nested, lambda b: torch.randn(b, 7, 16), 2, 2),
    "side_reader": (models.SideReader, lambda b: torch.randn(b, 7, 16), 2, 1),
}


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_function_preserved(case, n, method):
    factory, make_input, blocks, streams = CASES[case]
    model = factory().eval()
    converted = mhc_fx.convert(model, (make_input(2),), n=n, method=method)
    assert mhc_fx.report(converted).num_blocks == blocks
    assert mhc_fx.report(converted).num_streams == streams
    converted.eval()
    x = make_input(3)  # another batch size: the capture is dynamic
    with torch.no_grad():
        for out, ref in zip(_outputs(converted(x)), _outputs(model(x))):
            assert rel_err(out, ref) <= 1e-5


def test_projection_shortcut_is_reported():
    report = mhc_fx.find_residuals(models.TinyResNet(), (torch.randn(2, 3, 8, 8),))
    assert report.num_blocks == 3
    assert any("projection shortcut" in s.reason and s.owner == "blocks.2" for s in report.skipped)
    assert "projection shortcut" in str(report)


def test_example_inputs_are_required():
    with pytest.raises(mhc_fx.ConfigError, match="needs example inputs"):
        mhc_fx.convert(models.TinyResNet(), n=2)


def test_graph_module_is_a_clear_error():
    gm = torch.fx.symbolic_trace(models.PostNorm())
    with pytest.raises(mhc_fx.ConversionError, match="convert the module it was traced from"):
        mhc_fx.convert(gm, (torch.randn(2, 7, 16),))


@pytest.mark.parametrize("factory,x", [(models.TinyUNet, torch.randn(1, 3, 8, 8)), (models.NoResidual, torch.randn(2, 16))])
def test_nothing_to_convert_is_a_clear_error(factory, x):
    with pytest.raises(mhc_fx.ConversionError, match="no residual connection"):
        mhc_fx.convert(factory(), (x,))
    assert mhc_fx.find_residuals(factory(), (x,)).num_blocks == 0


def test_residual_method_keeps_the_adds():
    model = TinyGPT(layers=2).eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 8))
    converted = mhc_fx.convert(model, (ids,), method="residual")
    assert converted is model and not mhc_fx.is_converted(converted)
    assert mhc_fx.find_residuals(model, (ids,)).num_blocks == 4
    report = mhc_fx.report(model)  # the A/B baseline reports the blocks it kept as they are
    assert report.method == "residual" and [b.name for b in report.blocks][:2] == ["blocks.0.attn", "blocks.0.mlp"]
    assert report.num_blocks == 4 and all(b.module == "" for b in report.blocks)
    assert mhc_fx.report(copy.deepcopy(model)).blocks == report.blocks  # it belongs to the model: copies carry it
    with pytest.raises(mhc_fx.ConversionError, match="not converted"):
        mhc_fx.report(TinyGPT(layers=2))
    assert not any(isinstance(m, mhc_fx.nn.Connection) for m in converted.modules())
    with torch.no_grad():
        assert torch.equal(converted.eval()(ids), ref(ids))


def test_connections_are_named_after_their_owner():
    converted = mhc_fx.convert(TinyGPT(layers=2), (torch.randint(0, 96, (2, 8)),))
    names = [b.module for b in mhc_fx.report(converted).blocks]
    assert names == ["blocks.0.attn_mhc", "blocks.0.mlp_mhc", "blocks.1.attn_mhc", "blocks.1.mlp_mhc"]
    assert "blocks.1.mlp_mhc.phi" in converted.state_dict()
    assert "tok.weight" in converted.state_dict()  # original keys are kept


def test_learned_reduce_has_parameters_and_preserves():
    model = TinyGPT(layers=2).eval()
    ids = torch.randint(0, 96, (2, 8))
    converted = mhc_fx.convert(model, (ids,), reduce="learned").eval()
    assert "mhc_streams.0.reduce.weight" in converted.state_dict()
    with torch.no_grad():
        assert rel_err(converted(ids), model(ids)) <= 1e-5


def test_non_contiguous_example_input():
    """torch.export alone mis-guards a sliced example; convert makes examples contiguous."""
    model = TinyGPT(layers=1).eval()
    ids = torch.randint(0, 96, (4, 40))
    converted = mhc_fx.convert(model, (ids[:2, :16],)).eval()
    with torch.no_grad():
        assert rel_err(converted(ids), model(ids)) <= 1e-5

"""Bad input gets a clear error naming the fix, and nothing half-converted comes back."""

import pytest
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT

from . import models


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("n", 0, "MHCConfig.n must be an int from 1 to 8"),
        ("n", 9, "MHCConfig.n"),
        ("n", 2.0, "MHCConfig.n"),
        ("method", "mhc2", "MHCConfig.method must be one of"),
        ("init", "zeros", "MHCConfig.init"),
        ("reduce", "max", "MHCConfig.reduce"),
        ("sinkhorn_iters", 0, "MHCConfig.sinkhorn_iters"),
        ("feature_dim", 2, "MHCConfig.feature_dim"),
    ],
)
def test_invalid_config(field, value, match):
    with pytest.raises(mhc_fx.ConfigError, match=match):
        mhc_fx.MHCConfig(**{field: value})


def test_sum_reduce_cannot_preserve():
    with pytest.raises(mhc_fx.ConfigError, match="reduce='sum'"):
        mhc_fx.MHCConfig(reduce="sum")
    mhc_fx.MHCConfig(reduce="sum", init="paper")  # allowed from scratch


def test_fused_ops_need_mhc():
    with pytest.raises(mhc_fx.ConfigError, match="fused_ops=True needs method='mhc'"):
        mhc_fx.MHCConfig(method="hc", fused_ops=True)


def test_convert_rejects_a_bad_override():
    with pytest.raises(mhc_fx.ConfigError, match="MHCConfig.n"):
        mhc_fx.convert(TinyGPT(layers=1), (torch.randint(0, 96, (2, 8)),), n=-1)


def test_untraceable_model_is_a_capture_error_naming_the_cause():
    with pytest.raises(mhc_fx.CaptureError, match=r"DataDependent in one graph.*Data-dependent.*Fix:"):
        mhc_fx.convert(models.DataDependent(), (torch.randn(2, 16),))


def test_already_converted():
    ids = torch.randint(0, 96, (2, 8))
    converted = mhc_fx.convert(TinyGPT(layers=1), (ids,))
    with pytest.raises(mhc_fx.ConversionError, match="already converted"):
        mhc_fx.convert(converted, (ids,))


def test_failed_conversion_leaves_the_model_untouched():
    model = models.NoResidual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mhc_fx.ConversionError):
        mhc_fx.convert(model, (torch.randn(2, 16),))
    assert list(model.state_dict()) == list(before)
    assert not any(isinstance(m, mhc_fx.nn.Connection) for m in model.modules())
    assert "forward" not in model.__dict__ and not mhc_fx.is_converted(model)

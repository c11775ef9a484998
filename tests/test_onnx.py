"""ONNX export of converted models, checked in ONNX Runtime against PyTorch and the original."""

import importlib.util

import pytest
import torch
from torch.utils import _pytree as pytree

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT

from .conftest import rel_err
from .real_models import REAL_MODELS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODELS = ["hf-gpt2", "hf-llama", "hf-vit", "timm-resnet18", "timm-convnext_atto"]


def _run(path, args, kwargs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), leaves)})


def _first_float(out):
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mhc", "hc"])
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_pytorch_and_the_original(name, method, tmp_path):
    factory, example, _ = REAL_MODELS[name]
    original = factory().eval()
    args, kwargs = example(2)
    # 4 Sinkhorn iterations instead of 20 keep the unrolled graphs (and the suite) small; the
    # export path does not depend on the count (the functions test below uses 20)
    converted = mhc_fx.convert(original, args, kwargs, n=4, method=method, sinkhorn_iters=4)
    path = tmp_path / "model.onnx"
    report = mhc_fx.export_onnx(converted, args, path, example_kwargs=kwargs)
    onnx.checker.check_model(str(path))
    assert len(report.checks) == 2 and report.checks[0].shapes != report.checks[1].shapes
    assert all(check.max_rel <= 1e-4 for check in report.checks)
    # function preservation survives export: the file reproduces the unconverted model
    args, kwargs = example(3)
    with torch.no_grad():
        ref = _first_float(original(*args, **kwargs))
    assert rel_err(torch.from_numpy(_run(path, args, kwargs)[0]), ref) <= 1e-4


def test_functions_fold_connections_into_local_functions(tmp_path):
    ids = torch.randint(0, 96, (2, 16))
    converted = mhc_fx.convert(TinyGPT(layers=2), (ids,))
    report = mhc_fx.export_onnx(converted, (ids,), tmp_path / "f.onnx", functions=True)
    assert report.functions == {"MHCPre": 4, "Sinkhorn": 4, "PostRes": 4}
    model = onnx.load(str(tmp_path / "f.onnx"))
    assert {(f.domain, f.name) for f in model.functions} == {("mhc_fx", "MHCPre"), ("mhc_fx", "Sinkhorn"), ("mhc_fx", "PostRes")}
    calls = [n.op_type for n in model.graph.node if n.domain == "mhc_fx"]
    assert calls.count("MHCPre") == 4 and calls.count("PostRes") == 4
    assert not any(n.op_type == "ReduceSum" for n in model.graph.node)  # Sinkhorn lives in its function
    assert all(check.max_rel <= 1e-4 for check in report.checks)


def test_hc_functions(tmp_path):
    ids = torch.randint(0, 96, (2, 16))
    converted = mhc_fx.convert(TinyGPT(layers=1), (ids,), method="hc")
    report = mhc_fx.export_onnx(converted, (ids,), tmp_path / "hc.onnx", functions=True)
    assert report.functions == {"HCPre": 2, "PostRes": 2}


def test_missing_directory(tmp_path):
    with pytest.raises(mhc_fx.ExportError, match="does not exist"):
        mhc_fx.export_onnx(TinyGPT(layers=1), (torch.randint(0, 96, (2, 8)),), tmp_path / "no" / "m.onnx")


def test_verify_without_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(mhc_fx.ExportError, match=r"pip install 'mhc_fx\[onnx\]'"):
        mhc_fx.export_onnx(TinyGPT(layers=1), (torch.randint(0, 96, (2, 8)),), tmp_path / "m.onnx")


@torch.library.custom_op("mhc_fx_test::scale", mutates_args=())
def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _Untranslatable(torch.nn.Module):
    def forward(self, x):
        return _scale(x) + 1


def test_failing_op_is_named(tmp_path):
    with pytest.raises(mhc_fx.ExportError, match="mhc_fx_test.scale"):
        mhc_fx.export_onnx(_Untranslatable(), (torch.randn(2, 3),), tmp_path / "m.onnx", verify=False)

"""The ``mhc-fx`` command."""

import pytest

from mhc_fx.cli import main


def test_default_job_converts_the_embedded_model(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "TinyGPT: 8 residual blocks in 1 streams → mhc (n=4)" in out
    err = float(out.rsplit("relative error", 1)[1])
    assert err <= 1e-5


def test_factory_spec_and_input_shape(capsys):
    assert main(["--model", "tests.models:TinyResNet", "--input-shape", "2,3,8,8", "--n", "2", "--method", "hc"]) == 0
    assert "3 residual blocks in 2 streams → hc (n=2)" in capsys.readouterr().out


def test_nothing_to_convert_exits_1(capsys):
    assert main(["--model", "tests.models:NoResidual", "--input-shape", "2,16"]) == 1
    assert "no residual connection" in capsys.readouterr().out


def test_bad_spec():
    with pytest.raises(SystemExit, match="module.path:factory"):
        main(["--model", "nonsense"])


def test_export_subcommand(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "gpt.onnx"
    assert main(["export", "--out", str(out), "--functions"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "MHCPre" in text and "ONNX Runtime" in text

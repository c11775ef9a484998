"""The ``mhc-fx`` command: demo, inspect, convert, export."""

import json

import torch

import mhc_fx

import pytest

from mhc_fx.cli import main

pytestmark = pytest.mark.slow


def test_demo_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("onnxruntime")
    assert main(["demo", "--steps", "30", "--layers", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("residual", "hc", "mhc"):
        assert method in out
    for png in ("loss.png", "gain.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (tmp_path / "mhc.onnx").exists() and "verified in ONNX Runtime on 2 shapes" in out


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("timm:resnet18", "ResNet: 5 residual blocks"),
        ("hf:gpt2", "GPT2Model: 4 residual blocks"),
        ("tests.models:PostNorm", "PostNorm: 3 residual blocks"),
    ],
)
def test_inspect_spec_forms(spec, expect, capsys):
    args = ["inspect", spec] + (["--input-shape", "2,7,16"] if spec.startswith("tests.") else [])
    assert main(args) == 0
    assert expect in capsys.readouterr().out


def test_inspect_local_hf_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100)
    transformers.BertModel(config).save_pretrained(tmp_path)
    assert main(["inspect", f"hf:{tmp_path}"]) == 0
    assert "BertModel: 4 residual blocks" in capsys.readouterr().out


def test_convert_saves_safetensors_and_config(tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["convert", "mhc_fx.demo.zoo:TinyGPT", "--n", "2", "--out", str(tmp_path)]) == 0
    assert "mhc_fx.from_pretrained" in capsys.readouterr().out
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "blocks.0.attn_mhc.phi" in state and state["blocks.0.attn_mhc.phi"].shape == (2 * 64, 8)
    meta = json.loads((tmp_path / "mhc_config.json").read_text())
    assert meta["config"]["n"] == 2 and len(meta["blocks"]) == 8
    loaded = mhc_fx.from_pretrained(tmp_path, trust_remote_code=True)  # the spec names code: opt in
    assert mhc_fx.is_converted(loaded) and mhc_fx.report(loaded).num_blocks == 8
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_a_saved_non_hf_model_loads_back_with_its_trained_weights(tmp_path):
    from mhc_fx.demo.zoo import TinyGPT
    from mhc_fx.pretrained import save

    ids = torch.randint(0, 96, (2, 8))
    model = mhc_fx.convert(TinyGPT(), (ids,), n=2).eval()
    with torch.no_grad():  # off init: trained connections, and a changed original weight
        for name, p in model.named_parameters():
            if "_mhc." in name or name == "tok.weight":
                p.add_(0.1 * torch.randn_like(p))
    save(model, tmp_path, "mhc_fx.demo.zoo:TinyGPT")
    loaded = mhc_fx.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is TinyGPT and not loaded.training
    other = torch.randint(0, 96, (3, 5))  # another shape than the conversion's example
    with torch.no_grad():
        assert torch.equal(loaded(other), model(other))
    with pytest.raises(mhc_fx.ConversionError, match="model_class"):
        mhc_fx.from_pretrained(tmp_path, model_class=TinyGPT)
    with pytest.raises(mhc_fx.ConversionError, match="not converted"):
        save(TinyGPT(), tmp_path / "plain", "mhc_fx.demo.zoo:TinyGPT")
    two_layers = mhc_fx.convert(TinyGPT(layers=2), (ids,), n=2)  # the spec builds another architecture
    save(two_layers, tmp_path / "other", "mhc_fx.demo.zoo:TinyGPT")
    with pytest.raises(mhc_fx.ConversionError, match="does not match the saved weights"):
        mhc_fx.from_pretrained(tmp_path / "other", trust_remote_code=True)


def test_export_subcommand(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "gpt.onnx"
    assert main(["export", "tests.models:PostNorm", "--input-shape", "2,7,16", "--out", str(out), "--functions"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "MHCPre" in text and "ONNX Runtime" in text


@pytest.mark.parametrize("spec", ["nonsense", "timm:", "hf:not_a_model_type", "no.such.module:f"])
def test_bad_spec_is_one_line(spec, capsys):
    assert main(["inspect", spec]) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "timm:NAME" in out and "module.path:factory" in out


def test_nothing_to_convert_exits_1(capsys):
    assert main(["inspect", "tests.models:NoResidual", "--input-shape", "2,16"]) == 0  # analysis only
    assert main(["convert", "tests.models:NoResidual", "--input-shape", "2,16", "--out", "/tmp/never"]) == 1
    assert "no residual connection" in capsys.readouterr().out


@pytest.mark.slow
def test_convert_then_export_for_generation_round_trip(tmp_path, capsys):
    """``mhc-fx convert hf:PATH --out A``, ``mhc-fx export hf:A --genai --out B``, then generation from B."""
    pytest.importorskip("onnxruntime_genai")
    from mhc_fx.export.genai import genai_generate

    from .real_models import REAL_MODELS

    factory, _, _ = REAL_MODELS["hf-gpt2"]
    factory().save_pretrained(tmp_path / "plain")
    assert main(["convert", f"hf:{tmp_path / 'plain'}", "--n", "2", "--out", str(tmp_path / "A")]) == 0
    converted = mhc_fx.from_pretrained(tmp_path / "A")
    assert type(converted).__name__ == "GPT2LMHeadModel" and mhc_fx.report(converted).n == 2  # the LM head is kept
    assert main(["export", f"hf:{tmp_path / 'A'}", "--genai", "--out", str(tmp_path / "B")]) == 0
    assert "ONNX Runtime GenAI = PyTorch generate()" in capsys.readouterr().out
    prompt = [3, 14, 15, 92]
    with torch.no_grad():
        expected = converted.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                                             max_new_tokens=6, do_sample=False)[0, 4:].tolist()
    got = genai_generate(tmp_path / "B", prompt, 6)
    eos = converted.config.eos_token_id
    assert got == (expected[: expected.index(eos)] if eos in expected else expected)
    assert main(["export", f"hf:{tmp_path / 'A'}", "--genai"]) == 1  # a folder must be named

"""A saved folder is data: loading it imports and runs nothing it names unless the caller opts in
(``trust_remote_code=True``) or passes the model; and loading a converted Hugging Face save says
nothing false (its connection weights are not "unexpected")."""

import json
import sys

import pytest
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT
from mhc_fx.pretrained import META_FILE, save


def _saved(tmp_path, spec):
    """A converted TinyGPT moved off init and saved with ``spec`` in its mhc_config.json."""
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 8))
    model = mhc_fx.convert(TinyGPT(layers=2), (ids,), n=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_mhc." in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = save(model, tmp_path / "saved", "mhc_fx.demo.zoo:TinyGPT")
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "spec": spec}))
    return model, folder


FACTORY_MODULE = '''
import pathlib
pathlib.Path("imported.marker").write_text("this module ran")

def build():
    from mhc_fx.demo.zoo import TinyGPT
    return TinyGPT(layers=2)
'''


def test_a_folder_naming_a_factory_runs_nothing_without_opt_in(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "folder_factory.py").write_text(FACTORY_MODULE)
    monkeypatch.chdir(workdir)
    model, folder = _saved(tmp_path, "folder_factory:build")
    with pytest.raises(mhc_fx.ConversionError, match=r"'folder_factory'.*build\(\).*ran none of it.*trust_remote_code=True"):
        mhc_fx.from_pretrained(folder)
    assert not (workdir / "imported.marker").exists() and "folder_factory" not in sys.modules
    ids = torch.randint(0, 96, (3, 5))  # another shape than the conversion's example
    with torch.no_grad():
        expected = model(ids)
        # the caller's own model, or a function that builds it: nothing of the folder runs
        for given in (TinyGPT(layers=2), lambda: TinyGPT(layers=2)):
            assert torch.equal(mhc_fx.from_pretrained(folder, model=given)(ids), expected)
        assert not (workdir / "imported.marker").exists()
        # opting in imports the module and calls its factory
        loaded = mhc_fx.from_pretrained(folder, trust_remote_code=True)
        assert (workdir / "imported.marker").exists()
        assert torch.equal(loaded(ids), expected)
    sys.modules.pop("folder_factory", None)


def test_a_folder_naming_any_callable_is_refused(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path, "os:getcwd")
    called = []
    monkeypatch.setattr("os.getcwd", lambda: called.append(1) or str(tmp_path))
    with pytest.raises(mhc_fx.ConversionError, match=r"'os'.*getcwd\(\).*trust_remote_code"):
        mhc_fx.from_pretrained(folder)
    assert not called


def test_model_argument_is_checked(tmp_path):
    _, folder = _saved(tmp_path, "mhc_fx.demo.zoo:TinyGPT")
    with pytest.raises(mhc_fx.ConversionError, match="does not match the saved weights"):
        mhc_fx.from_pretrained(folder, model=TinyGPT(layers=3))
    with pytest.raises(mhc_fx.ConversionError, match="nn.Module"):
        mhc_fx.from_pretrained(folder, model=lambda: "not a model")


@pytest.mark.slow
def test_hf_load_reports_no_connection_weight_as_unexpected(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from mhc_fx.convert.plan import Plan
    from mhc_fx.pretrained import _connection_keys_expected, _connection_prefixes

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    ids = torch.randint(0, 64, (2, 6))
    model = mhc_fx.convert(transformers.LlamaForCausalLM(config), example_kwargs={"input_ids": ids})
    model.save_pretrained(tmp_path)
    cls = transformers.LlamaForCausalLM
    own = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    prefixes = _connection_prefixes(Plan.from_dict(model.config.mhc_fx["plan"]))
    _, plain = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert any(k.startswith(prefixes) for k in plain["unexpected_keys"])  # what transformers alone reports
    # a key that is genuinely unexpected is still reported
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({**weights, "model.stray.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with _connection_keys_expected(cls, prefixes):
        _, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"model.stray.weight"}
    assert cls.__dict__.get("_keys_to_ignore_on_load_unexpected") == own  # restored
    loaded = mhc_fx.from_pretrained(tmp_path)
    assert cls.__dict__.get("_keys_to_ignore_on_load_unexpected") == own
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

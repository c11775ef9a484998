"""Model specs of the command line: ``timm:NAME``, ``hf:MODEL_TYPE``, ``hf:PATH``,
``module.path:factory`` → a model and an example input."""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
from typing import Any

import torch
from torch import nn

FORMS = "timm:NAME, hf:MODEL_TYPE (random weights, small config), hf:PATH (local directory) or module.path:factory"

#: the small config ``hf:MODEL_TYPE`` builds (each applied where the config has the field)
SMALL_HF = {
    "num_hidden_layers": 2, "n_layer": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2,
    "vocab_size": 256, "image_size": 32, "patch_size": 8,
}


class SpecError(ValueError):
    """A spec that names no loadable model (the message is one line with the accepted forms)."""


def is_code_spec(spec: str) -> bool:
    """Whether ``spec`` names code to import and call (``module.path:factory``), not a model of a
    library (``timm:``, ``hf:``)."""
    return spec.partition(":")[0] not in ("timm", "hf")


def load(
    spec: str, input_shape: tuple[int, ...] | None = None, *, trust_remote_code: bool = False,
    model: nn.Module | None = None,
) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """``(model in eval mode, example args, example kwargs)`` for ``spec``.

    ``hf:PATH`` loads the class the directory's ``config.json`` names in ``architectures`` (a
    causal LM keeps its head); ``trust_remote_code`` is passed to transformers. A save of a
    converted model is :func:`mhc_fx.from_pretrained`'s to load: pass what it returned as
    ``model`` (only the example inputs are made then; :func:`mhc_fx.pretrained.load_spec` does
    both), else it is a :class:`SpecError`."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SpecError(f"bad model spec {spec!r}: use {FORMS}")
    if model is not None and not (kind == "hf" and pathlib.Path(rest).is_dir()):
        raise SpecError(f"model= is the converted model of an hf:PATH save; spec {spec!r} names no such folder")
    torch.manual_seed(0)
    try:
        if kind == "timm":
            model, args, kwargs = _timm(rest)
        elif kind == "hf":
            model, args, kwargs = _hf(rest, trust_remote_code, model)
        else:
            model, args, kwargs = _factory(kind, rest)
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure becomes the one-line error
        raise SpecError(f"cannot load {spec!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); use {FORMS}") from err
    if input_shape is not None:
        args, kwargs = (torch.randn(input_shape),), {}
    return model.eval(), args, kwargs


def _timm(name: str):
    import timm

    model = timm.create_model(name, pretrained=False)
    return model, (torch.randn(2, *model.pretrained_cfg["input_size"]),), {}


def architecture_class(hf_config: Any) -> type | None:
    """The transformers class the config's first ``architectures`` entry names (``LlamaForCausalLM``), or None."""
    import transformers

    names = getattr(hf_config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def is_converted_save(path: str, trust_remote_code: bool = False) -> bool:
    """Whether ``path`` is a Hugging Face folder saved from a converted model."""
    import transformers

    from .convert.conversion import HF_CONFIG_KEY

    if not (pathlib.Path(path) / "config.json").is_file():
        return False
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return bool(getattr(config, HF_CONFIG_KEY, None))


def _hf(what: str, trust_remote_code: bool, model: nn.Module | None):
    import transformers

    from .convert.conversion import HF_CONFIG_KEY

    if pathlib.Path(what).is_dir():
        config = transformers.AutoConfig.from_pretrained(what, trust_remote_code=trust_remote_code)
        if getattr(config, HF_CONFIG_KEY, None) and model is None:
            raise SpecError(f"{what} is a save of a converted model: load it with mhc_fx.from_pretrained({what!r})")
        if model is None:
            model_class = architecture_class(config) or transformers.AutoModel
            model = model_class.from_pretrained(what, trust_remote_code=trust_remote_code)
    else:
        config = transformers.AutoConfig.for_model(what)
        for field, value in SMALL_HF.items():
            if hasattr(config, field):
                setattr(config, field, value)
        model = transformers.AutoModel.from_config(config)
    if hasattr(config, "image_size") and not hasattr(config, "vocab_size"):
        size = config.image_size
        return model, (), {"pixel_values": torch.randn(2, config.num_channels, size, size)}
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, min(config.vocab_size, 256), (2, 16))}
    if getattr(config, "use_cache", False):
        kwargs["use_cache"] = False
    return model, (), kwargs


def _factory(module: str, attr: str):
    if os.getcwd() not in sys.path:  # like `python -m`: modules of the working directory load
        sys.path.insert(0, os.getcwd())
    model = getattr(importlib.import_module(module), attr)()
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    args = (torch.randint(0, emb.num_embeddings, (2, 16)),) if emb is not None else ()
    return model, args, {}

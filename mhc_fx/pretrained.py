"""Saved converted models: :func:`from_pretrained` loads them back.

Two formats, both with the conversion (the :class:`~mhc_fx.MHCConfig` and the plan) beside the
weights, so loading needs no example inputs and no capture:

- Hugging Face: a converted model keeps its own ``save_pretrained``; the connection weights are
  in its ``state_dict`` (``model.layers.0.mlp_mhc.phi``...) and the conversion is an entry
  ``mhc_fx`` of its config, so ``config.json`` carries it.
- Any other model (``mhc-fx convert SPEC`` with a timm or ``module.path:factory`` spec, or
  :func:`save`): ``model.safetensors`` (the whole ``state_dict``) and ``mhc_config.json``
  (the spec that builds the model, the config and the plan).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from torch import nn

from .config import MHCConfig
from .convert.conversion import HF_CONFIG_KEY, block_reports, build_modules, install
from .convert.guarded import ConvertedForward
from .convert.plan import STREAMS_MODULE, Plan
from .convert.report import ConversionReport
from .errors import ConversionError


def _checkpoint_tensors(path: pathlib.Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path} has no .safetensors weights; save the model with save_pretrained(dir)")
    out = {}
    for file in files:
        out.update({k: v for k, v in load_file(str(file)).items() if k.startswith(prefixes)})
    return out


#: the conversion file of a non-Hugging Face save (beside ``model.safetensors``)
META_FILE = "mhc_config.json"


def save(model: nn.Module, path: str | os.PathLike, spec: str) -> pathlib.Path:
    """Save a converted model that is not a Hugging Face model: ``path/model.safetensors`` (its
    whole ``state_dict``) and ``path/mhc_config.json`` (``spec``, the config, the plan, the
    blocks). ``spec`` builds the unconverted model again when loading
    (:func:`mhc_fx.specs.load`: ``timm:NAME`` or ``module.path:factory``)."""
    from safetensors.torch import save_file

    forward = model.__dict__.get("forward")
    if not isinstance(forward, ConvertedForward):
        raise ConversionError(f"{type(model).__name__} is not converted by mhc_fx; convert it before saving")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    meta = {
        "spec": spec,
        "config": dataclasses.asdict(forward.config),
        "plan": forward.plan.to_dict(),
        "blocks": [dataclasses.asdict(b) for b in forward.report.blocks],
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a converted model saved with ``save_pretrained(path)`` (Hugging Face) or by
    :func:`save` / ``mhc-fx convert`` (any other model).

    Args:
        path: the directory (its ``config.json`` has an ``mhc_fx`` entry, or it holds
            ``mhc_config.json``).
        model_class: Hugging Face only: the transformers class to load with (default: the
            config's first ``architectures`` entry, e.g. ``LlamaForCausalLM``).
        kwargs: Hugging Face only: passed to ``model_class.from_pretrained`` (``torch_dtype``, ...).

    Returns:
        the converted model (eval mode for a spec-built one), its weights and connection
        weights as saved.

    Raises:
        ConversionError: the directory holds no mhc_fx conversion, or a weight is missing.
    """
    path = pathlib.Path(path)
    if (path / META_FILE).exists():
        if model_class is not None or kwargs:
            raise ConversionError(f"{path} is a spec-built save ({META_FILE}): model_class and loading kwargs do not apply")
        return _from_spec_save(path)
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path)
    entry = getattr(hf_config, HF_CONFIG_KEY, None)
    if not entry:
        raise ConversionError(
            f"{path} holds no mhc_fx conversion (its config.json has no '{HF_CONFIG_KEY}' entry); load it with "
            "transformers and call mhc_fx.convert"
        )
    if model_class is None:
        names = getattr(hf_config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise ConversionError(f"{path}: config.json names no transformers architecture; pass model_class=")
        model_class = getattr(transformers, names[0])
    return _install_saved(model_class.from_pretrained(path, **kwargs), path, entry, connections_only=True)


def _from_spec_save(path: pathlib.Path) -> nn.Module:
    from .specs import load

    meta = json.loads((path / META_FILE).read_text())
    if "plan" not in meta:
        raise ConversionError(f"{path}/{META_FILE} has no plan (written by an older mhc_fx); convert and save the model again")
    model, _, _ = load(meta["spec"])
    return _install_saved(model, path, meta, connections_only=False, built_by=f"spec {meta['spec']!r}")


def _install_saved(
    model: nn.Module, path: pathlib.Path, entry: dict, connections_only: bool, built_by: str = ""
) -> nn.Module:
    """Register the saved plan's connection modules on the unconverted ``model``, load the saved
    weights (the connections' only, or all of them: then the keys must match exactly) and
    install the guarded call. ``built_by`` says where ``model`` came from, for errors."""
    config = MHCConfig(**entry["config"])
    plan = Plan.from_dict(entry["plan"])
    build_modules(model, plan, config)
    prefixes = tuple(f"{b.connection}." for b in plan.blocks) + (f"{STREAMS_MODULE}.",)
    state = model.state_dict()
    expected = {k for k in state if k.startswith(prefixes) or not connections_only}
    saved = _checkpoint_tensors(path, prefixes if connections_only else ("",))
    missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if built_by and (missing or extra):
        raise ConversionError(
            f"{path}: the model built by {built_by} does not match the saved weights (missing {missing[:4]}, "
            f"unexpected {extra[:4]}); the spec must build the architecture that was saved"
        )
    if missing:
        raise ConversionError(f"{path}: the checkpoint lacks connection weights {missing[:4]}; save it again")
    model.load_state_dict({k: saved[k] for k in expected}, strict=False)
    report = ConversionReport(
        type(model).__name__, config.method, config.n, block_reports(plan, True), [], notes=[f"loaded from {path}"],
        new_parameters=sum(state[k].numel() for k in state if k.startswith(prefixes)),
    )
    install(model, plan, config, report)
    return model

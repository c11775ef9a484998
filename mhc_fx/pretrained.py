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

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterator

from torch import nn

from .config import MHCConfig
from .convert.conversion import HF_CONFIG_KEY, block_reports, build_modules, install
from .convert.guarded import ConvertedForward
from .convert.plan import STREAMS_MODULE, Plan
from .convert.conversion_report import ConversionReport
from .errors import ConversionError
from .specs import architecture_class, is_code_spec, is_converted_save, load


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


def from_pretrained(
    path: str | os.PathLike,
    model_class: type | None = None,
    *,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a converted model saved with ``save_pretrained(path)`` (Hugging Face) or by
    :func:`save` / ``mhc-fx convert`` (any other model).

    A saved folder is data: loading imports and runs no code that the folder names unless the
    caller says so. A spec-built save whose spec is ``module.path:factory`` loads only with
    ``model=`` (the unconverted model, or a function that builds it) or ``trust_remote_code=True``
    (import ``module.path`` and call ``factory``); ``timm:``/``hf:`` specs name no code.

    Args:
        path: the directory (its ``config.json`` has an ``mhc_fx`` entry, or it holds
            ``mhc_config.json``).
        model_class: Hugging Face only: the transformers class to load with (default: the
            config's first ``architectures`` entry, e.g. ``LlamaForCausalLM``).
        model: spec-built saves only: the unconverted model the weights go into (or a function
            that builds it), instead of the one the saved spec builds.
        trust_remote_code: allow the code the folder names to run (a ``module.path:factory``
            spec; for Hugging Face, passed to transformers like its own flag).
        kwargs: Hugging Face only: passed to ``model_class.from_pretrained`` (``torch_dtype``, ...).

    Returns:
        the converted model (eval mode for a spec-built one), its weights and connection
        weights as saved.

    Raises:
        ConversionError: the directory holds no mhc_fx conversion, a weight is missing, or the
            folder asks to run code and neither ``model=`` nor ``trust_remote_code=True`` allows it.
    """
    path = pathlib.Path(path)
    if (path / META_FILE).exists():
        if model_class is not None or kwargs:
            raise ConversionError(f"{path} is a spec-built save ({META_FILE}): model_class and loading kwargs do not apply")
        return _from_spec_save(path, model, trust_remote_code)
    if model is not None:
        raise ConversionError(f"{path} is a Hugging Face save: model= does not apply (model_class= picks the class)")
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    entry = getattr(hf_config, HF_CONFIG_KEY, None)
    if not entry:
        raise ConversionError(
            f"{path} holds no mhc_fx conversion (its config.json has no '{HF_CONFIG_KEY}' entry); load it with "
            "transformers and call mhc_fx.convert"
        )
    if model_class is None:
        model_class = architecture_class(hf_config)
        if model_class is None:
            raise ConversionError(f"{path}: config.json names no transformers architecture; pass model_class=")
    prefixes = _connection_prefixes(Plan.from_dict(entry["plan"]))
    with _connection_keys_expected(model_class, prefixes):
        loaded = model_class.from_pretrained(path, **kwargs)
    return _install_saved(loaded, path, entry, connections_only=True)


def load_spec(
    spec: str, input_shape: tuple[int, ...] | None = None, *, trust_remote_code: bool = False
) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """:func:`mhc_fx.specs.load` (``(model, example args, example kwargs)``), where an
    ``hf:PATH`` save of a converted model loads converted (:func:`from_pretrained`)."""
    kind, _, rest = spec.partition(":")
    model = None
    if kind == "hf" and is_converted_save(rest, trust_remote_code):
        model = from_pretrained(rest, trust_remote_code=trust_remote_code)
    return load(spec, input_shape, trust_remote_code=trust_remote_code, model=model)


def _connection_prefixes(plan: Plan) -> tuple[str, ...]:
    """The ``state_dict`` prefixes of the plan's connection modules (``model.layers.0.mlp_mhc.``)."""
    return tuple(f"{b.connection}." for b in plan.blocks) + (f"{STREAMS_MODULE}.",)


@contextlib.contextmanager
def _connection_keys_expected(model_class: type, prefixes: tuple[str, ...]) -> Iterator[None]:
    """While transformers loads ``model_class`` (still unconverted), the connection weights in the
    checkpoint are keys it expects to ignore, not "UNEXPECTED" ones in its load report: they are
    loaded right after (:func:`_install_saved`). Any other unexpected key is still reported."""
    own = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected", _ABSENT)
    inherited = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []
    model_class._keys_to_ignore_on_load_unexpected = [*inherited, *(f"^{re.escape(p)}" for p in prefixes)]
    try:
        yield
    finally:
        if own is _ABSENT:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = own


_ABSENT = object()


def _from_spec_save(path: pathlib.Path, model: nn.Module | Callable[[], nn.Module] | None, trust_remote_code: bool) -> nn.Module:
    meta = json.loads((path / META_FILE).read_text())
    if "plan" not in meta:
        raise ConversionError(f"{path}/{META_FILE} has no plan (written by an older mhc_fx); convert and save the model again")
    spec = meta["spec"]
    if model is not None:
        built = model if isinstance(model, nn.Module) else model()
        if not isinstance(built, nn.Module):
            raise ConversionError(f"model= must be an nn.Module or a function returning one, got {type(built).__name__}")
        return _install_saved(built.eval(), path, meta, connections_only=False, built_by="model=")
    if is_code_spec(spec) and not trust_remote_code:
        module, _, factory = spec.partition(":")
        raise ConversionError(
            f"{path}/{META_FILE} asks to build the model by importing {module!r} and calling {factory}() (spec "
            f"{spec!r}); loading ran none of it. If you trust this folder, pass trust_remote_code=True (CLI: "
            "--trust-remote-code); or pass model= with the unconverted model (or a function that builds it)"
        )
    built, _, _ = load(spec)
    return _install_saved(built, path, meta, connections_only=False, built_by=f"spec {spec!r}")

def _install_saved(
    model: nn.Module, path: pathlib.Path, entry: dict, connections_only: bool, built_by: str = ""
) -> nn.Module:
    """Register the saved plan's connection modules on the unconverted ``model``, load the saved
    weights (the connections' only, or all of them: then the keys must match exactly) and
    install the guarded call. ``built_by`` says where ``model`` came from, for errors."""
    config = MHCConfig(**entry["config"])
    plan = Plan.from_dict(entry["plan"])
    build_modules(model, plan, config)
    prefixes = _connection_prefixes(plan)
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

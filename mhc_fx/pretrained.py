"""Hugging Face models: ``save_pretrained`` and :func:`from_pretrained`.

A converted Hugging Face model keeps its own ``save_pretrained``: the connection weights are in
its ``state_dict`` (``model.layers.0.mlp_mhc.phi``...) and the conversion — the
:class:`~mhc_fx.MHCConfig` and the plan — is an entry ``mhc_fx`` of its config, so
``config.json`` carries it. :func:`from_pretrained` loads such a directory back as a converted
model with its trained connections, without example inputs or a new capture.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from torch import nn

from .config import MHCConfig
from .convert.conversion import HF_CONFIG_KEY, block_reports, build_modules, install
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


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a converted Hugging Face model saved with ``save_pretrained(path)``.

    Args:
        path: the directory ``save_pretrained`` wrote (its ``config.json`` has an ``mhc_fx`` entry).
        model_class: the transformers class to load with (default: the config's first
            ``architectures`` entry, e.g. ``LlamaForCausalLM``).
        kwargs: passed to ``model_class.from_pretrained`` (``torch_dtype``, ...).

    Returns:
        the converted model, its connection weights as saved.

    Raises:
        ConversionError: the directory holds no mhc_fx conversion, or a connection weight is missing.
    """
    import transformers

    path = pathlib.Path(path)
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
    config = MHCConfig(**entry["config"])
    plan = Plan.from_dict(entry["plan"])
    model = model_class.from_pretrained(path, **kwargs)
    build_modules(model, plan, config)
    prefixes = tuple(f"{b.connection}." for b in plan.blocks) + (f"{STREAMS_MODULE}.",)
    expected = {k for k in model.state_dict() if k.startswith(prefixes)}
    saved = _checkpoint_tensors(path, prefixes)
    missing = sorted(expected - set(saved))
    if missing:
        raise ConversionError(f"{path}: the checkpoint lacks connection weights {missing[:4]}; save it again")
    model.load_state_dict(saved, strict=False)
    report = ConversionReport(
        type(model).__name__, config.method, config.n, block_reports(plan, True), [], notes=[f"loaded from {path}"],
        new_parameters=sum(saved[k].numel() for k in expected),
    )
    install(model, plan, config, report)
    return model

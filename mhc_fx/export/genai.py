"""``export_genai``: a Hugging Face causal LM (converted or not) as an ONNX Runtime GenAI folder.

The folder holds ``model.onnx`` — one decoder step with its KV cache, the same file for the
prefill (past length 0) and for each new token —, ``genai_config.json`` and, when a tokenizer is
given, its files. The decoder step is the model's own ``forward`` with a ``DynamicCache`` built
from the past inputs, captured by ``torch.export`` and, for a converted model, rewritten with its
connections (:func:`~mhc_fx.export.onnx.exported_program`). Its inputs and outputs carry the names
ONNX Runtime GenAI reads::

    input_ids              int64[batch, sequence]
    attention_mask         int64[batch, past + sequence]
    position_ids           int64[batch, sequence]
    past_key_values.%d.key / .value     float[batch, kv_heads, past, head_dim]   (one per layer)
    → logits               float[batch, sequence, vocab]
    → present.%d.key / .value           float[batch, kv_heads, past + sequence, head_dim]

with batch, sequence and past length dynamic. ``verify=True`` loads the folder with
``onnxruntime_genai`` and compares a greedy generation from two prompts with the model's own
``generate(do_sample=False)``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import torch
from torch import nn

from .onnx import ExportError, _require, exported_program, onnx_program

#: Hugging Face ``model_type`` → the GenAI model type its decoder runs as. GPT-2 runs as GenAI's
#: generic ``decoder``: GenAI's own ``gpt2`` type expects GPT-2's original fused cache layout.
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "decoder"}
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


@dataclasses.dataclass
class GenAIReport:
    """What :func:`export_genai` wrote.

    Attributes:
        folder: the GenAI model folder; model_type: its ``genai_config.json`` type; layers,
        kv_heads, head_dim: the cache's layout; nodes: nodes of the ONNX graph; checked: the
        prompts (token ids) whose greedy continuations GenAI and PyTorch agreed on, with them.
    """

    folder: pathlib.Path
    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    nodes: int
    checked: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)


def _decoder_config(model: nn.Module):
    """The model's text config, or an :class:`ExportError` saying why it cannot be exported this way."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate") or not hasattr(config, "get_text_config"):
        raise ExportError(
            f"export_genai exports Hugging Face causal LMs (a transformers model with generate()); "
            f"{type(model).__name__} is not one: use mhc_fx.export_onnx"
        )
    text = config.get_text_config(decoder=True)
    if text.model_type not in GENAI_TYPES:
        raise ExportError(
            f"export_genai supports the {sorted(GENAI_TYPES)} model families; {type(model).__name__} is "
            f"{text.model_type!r}: export it with mhc_fx.export_onnx (use_cache=False), or add its family"
        )
    if getattr(text, "use_sliding_window", False) or "sliding_attention" in (getattr(text, "layer_types", None) or []):
        raise ExportError(f"{type(model).__name__} uses sliding-window attention, which export_genai does not export")
    return text


def _step(model: nn.Module, layers: int):
    """One decoder step of ``model``: ``(input_ids, attention_mask, position_ids, past)`` with
    ``past`` a list ``[k0, v0, k1, v1, ...]`` → ``(logits, present k0, present v0, ...)``."""
    from transformers import DynamicCache

    forward = type(model).forward
    cache_argument = "cache" if "cache" in forward.__code__.co_varnames else "past_key_values"

    def step(input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=model.config)
        out = forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{cache_argument: cache})
        present = out.cache if "cache" in out else out.past_key_values
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])

    return step


def export_genai(
    model: nn.Module,
    out_dir: str | pathlib.Path,
    tokenizer: Any = None,
    *,
    verify: bool = True,
    check_tokens: int = 8,
    eos_token_id: int | None = None,
) -> GenAIReport:
    """Write an ONNX Runtime GenAI model folder for ``model`` (a Hugging Face causal LM of the
    Llama, Qwen2 or GPT-2 family, converted by mhc_fx or not); see the module docstring.

    Args:
        model: the model; exported in eval mode (its mode is restored).
        out_dir: the folder to write (created).
        tokenizer: a Hugging Face tokenizer to save beside the model (GenAI reads ``tokenizer.json``).
        verify: load the folder with ``onnxruntime_genai`` and compare greedy generation of
            ``check_tokens`` new tokens from two prompts with ``model.generate(do_sample=False)``;
            a mismatch raises :class:`ExportError` naming the first differing position.
        eos_token_id: the end token GenAI stops at (default: the model's ``eos_token_id``).

    Returns:
        A :class:`GenAIReport`.
    """
    text = _decoder_config(model)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        raise ExportError(
            f"export_genai writes float32 folders (the only kind it checks); {type(model).__name__} has "
            f"{sorted(str(d) for d in dtypes)} parameters: export model.float()"
        )
    _require("onnxscript", "onnx", "ONNX export")
    if verify:
        _require("onnxruntime_genai", "genai", "verify=True (generating with ONNX Runtime GenAI)")
    eos = _end_token(model, text, eos_token_id)
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    try:
        example, (layers, kv_heads, head_dim) = _example(model, text)
        ep = exported_program(model, example, {}, dynamic=True, forward=_step(model, layers))
        names = ["input_ids", "attention_mask", "position_ids"] + [n % i for i in range(layers) for n in (PAST_KEY, PAST_VALUE)]
        outputs = ["logits"] + [n % i for i in range(layers) for n in (PRESENT_KEY, PRESENT_VALUE)]
        program, _ = onnx_program(ep, type(model).__name__, names, output_names=outputs)
        program.save(str(folder / "model.onnx"))
        model_type = GENAI_TYPES[text.model_type]
        (folder / "genai_config.json").write_text(json.dumps(
            _genai_config(text, model_type, layers, kv_heads, head_dim, eos), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        report = GenAIReport(folder, model_type, layers, kv_heads, head_dim, nodes=len(program.model.graph))
        if verify:
            _verify(model, report, text, eos, check_tokens)
        return report
    finally:
        model.train(was)


def _end_token(model: nn.Module, text: Any, eos_token_id: int | None) -> int:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    eos = text.eos_token_id if eos is None else eos
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None or not 0 <= eos < text.vocab_size:
        raise ExportError(
            f"{type(model).__name__}'s end token {eos} is not in its vocabulary of {text.vocab_size}: GenAI "
            "needs one; pass eos_token_id="
        )
    return int(eos)


def _example(model: nn.Module, text: Any) -> tuple[tuple, tuple[int, int, int]]:
    """Example inputs of the decoder step (batch 2, 3 new tokens after 4 cached ones: every size
    distinct and above 1, so each stays dynamic) and the cache layout ``(layers, kv_heads, head_dim)``
    read from the model's own cache."""
    batch, new, past = 2, 3, 4
    torch.manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, text.vocab_size, (batch, past + new), device=device)
    with torch.no_grad():
        out = model(input_ids=ids[:, :past], use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    pasts = [t.contiguous() for layer in cache.layers for t in (layer.keys, layer.values)]
    layers, (_, kv_heads, _, head_dim) = len(cache.layers), pasts[0].shape
    mask = torch.ones(batch, past + new, dtype=torch.long, device=device)
    positions = torch.arange(past, past + new, device=device).expand(batch, new).contiguous()
    return (ids[:, past:].contiguous(), mask, positions, pasts), (layers, kv_heads, head_dim)


def _genai_config(text: Any, model_type: str, layers: int, kv_heads: int, head_dim: int, eos: int) -> dict:
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    bos = text.bos_token_id if getattr(text, "bos_token_id", None) is not None else eos
    return {
        "model": {
            "type": model_type,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": _pad_token(text, eos),
            "vocab_size": text.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_dim,
                "hidden_size": text.hidden_size,
                "num_attention_heads": text.num_attention_heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE,
                },
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0, "top_k": 1, "top_p": 1.0,
            "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0, "num_return_sequences": 1, "early_stopping": True,
            "past_present_share_buffer": False,
        },
    }


def _pad_token(text: Any, eos: int) -> int:
    """The pad token GenAI fills batches with (and masks out of prompts): the model's, else the end token."""
    return text.pad_token_id if getattr(text, "pad_token_id", None) is not None else eos


def genai_generate(folder: str | pathlib.Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation of up to ``new_tokens`` tokens after ``prompt`` with ONNX Runtime GenAI:
    the new tokens (GenAI stops at the end token and leaves it out of its sequence)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


def _verify(model: nn.Module, report: GenAIReport, text: Any, eos: int, new_tokens: int) -> None:
    generator = torch.Generator().manual_seed(1)
    special = {eos, _pad_token(text, eos)}  # GenAI masks pad tokens out of prompts
    allowed = torch.tensor([t for t in range(text.vocab_size) if t not in special])
    prompts = [allowed[torch.randint(0, len(allowed), (length,), generator=generator)].tolist() for length in (5, 3)]
    device = next(model.parameters()).device
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=device), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        expected = out[0, len(prompt):].tolist()
        if eos in expected:  # GenAI ends the sequence before its end token
            expected = expected[: expected.index(eos)]
        got = genai_generate(report.folder, prompt, new_tokens)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ExportError(
                f"ONNX Runtime GenAI generates other tokens than PyTorch's generate() from prompt {prompt}: first "
                f"difference at new token {first} (GenAI {got}, PyTorch {expected}); folder kept at {report.folder}"
            )
        report.checked.append((prompt, got))

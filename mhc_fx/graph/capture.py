"""Capture: turn a call of the model into a pre-dispatch ATen graph the passes analyse.

Two front ends, one graph level:

- **Dynamo** (every call of a converted model, and ``torch.compile(backend="mhc")``): the graph
  Dynamo hands a backend is traced to pre-dispatch ATen by :func:`to_aten`; parameters are
  graph inputs (:func:`parameter_placeholders`). Dynamo's guards decide when a call needs a new
  capture.
- **torch.export** (ONNX export, :func:`export_graph`): ``strict=False`` with every input dim
  ``Dim.AUTO`` so batch and sequence stay dynamic in the file.
"""

from __future__ import annotations

import inspect
import itertools
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._guards import detect_fake_mode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError


def contiguous_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with every tensor contiguous: torch.export emits a broken input guard
    for a non-contiguous example (e.g. a slice ``ids[:, :-1]``)."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))


def auto_dims(args: tuple, kwargs: dict, fn) -> dict[str, Any]:
    """``Dim.AUTO`` on every dim of every tensor input, keyed by forward's parameter names."""
    bound = inspect.signature(fn).bind(*args, **kwargs)

    def spec(value):
        return pytree.tree_map(
            lambda t: {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None, value
        )

    return {name: spec(value) for name, value in bound.arguments.items()}


def export_graph(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    """``model``'s call on the example inputs, captured by ``torch.export`` (in its current
    mode) as a GraphModule with the module's attribute paths and no input guards."""
    shapes = auto_dims(args, kwargs, model.forward) if dynamic else None
    ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    return _without_input_guards(ep.module())


def _without_input_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the input-guard call export inserts (``_guards_fn``): its generated code breaks on
    re-tracing (torch.onnx, torch.export of the converted model), and without it the converted
    model, like the original, raises where its own code rejects an input."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    """``gm`` (a Dynamo graph) traced to pre-dispatch ATen, with ``meta["val"]`` (fake tensors)
    on every node and the source's ``nn_module_stack``."""
    fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]

    def run(*args):
        return _GradientAwareInterpreter(gm).run(*args)

    with torch.fx.traceback.preserve_node_meta(), fake_mode:
        return make_fx(run, pre_dispatch=True)(*fakes)


class _GradientAwareInterpreter(fx.Interpreter):
    """Runs a Dynamo graph under ``make_fx`` keeping what it says about gradients in the ATen graph:

    - ``x.data`` (Dynamo's ``_get_data_attr``, which ``make_fx`` would bake into a constant)
      becomes ``aten.detach``, and an ``inference_mode`` region (which ``make_fx`` drops) becomes
      a ``no_grad`` region (``_set_grad_enabled`` nodes);
    - an activation-checkpointed region (``torch.utils.checkpoint.checkpoint``, Hugging Face's
      ``gradient_checkpointing_enable``: Dynamo's ``tag_activation_checkpoint``) is inlined, its
      ops tagged as torch.compile tags them (``recompute = PREFER_RECOMPUTE``, one
      ``ac_graph_id`` per region), so the passes see its residual adds and AOTAutograd's
      partitioner recomputes the region in backward instead of saving it.
    """

    def call_function(self, target, args, kwargs):
        if target is torch.ops.higher_order.tag_activation_checkpoint:
            return _inline_checkpointed(args[0], args[1:])
        if target is torch._C._autograd._get_data_attr:
            return args[0].detach()
        if target is torch.autograd.grad_mode._enter_inference_mode:
            previous = torch.is_grad_enabled()
            if args[0]:
                torch._C._set_grad_enabled(False)
            return previous
        if target is torch.autograd.grad_mode._exit_inference_mode:
            torch._C._set_grad_enabled(args[0])
            return None
        return super().call_function(target, args, kwargs)


_region_ids = itertools.count(1)


def _inline_checkpointed(body: fx.GraphModule, operands: tuple) -> Any:
    """Run the body of a checkpointed region in place, its nodes tagged for recomputation."""
    from torch.utils.checkpoint import CheckpointPolicy

    if "_checkpoint_context_fn" in body.meta:
        raise CaptureError(
            "torch.utils.checkpoint with a context_fn (selective activation checkpointing) inside a converted "
            "model is not supported; use plain checkpointing (no context_fn), or the 'mhc' backend's "
            "recompute=True for the connections"
        )
    region = next(_region_ids)
    for node in body.graph.nodes:
        if node.op not in ("placeholder", "output"):
            node.meta["recompute"], node.meta["ac_graph_id"] = CheckpointPolicy.PREFER_RECOMPUTE, region
    return _GradientAwareInterpreter(body).run(*operands)


def has_checkpointed_regions(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` (from :func:`to_aten`) holds ops tagged for recomputation."""
    return any("recompute" in node.meta for node in gm.graph.nodes)


def inline_modules(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[str]]:
    """``gm`` with its ``call_module`` nodes traced into ATen ops, and the tensors of those
    modules (parameters, buffers) lifted to extra inputs after ``example_inputs``: the form a
    ``torch.compile`` backend takes (it sees every op, and every parameter as an input). The ops
    traced from a module name it in their ``nn_module_stack`` (a backend's reports say whose ops
    it fused). Returns the new graph and the names in ``gm`` of the lifted tensors, in input order."""
    for node in gm.graph.find_nodes(op="call_module"):
        stack = node.meta.setdefault("nn_module_stack", {})
        stack.setdefault(node.target, (node.target, type(gm.get_submodule(node.target))))
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    names, tensors = list(state), list(state.values())
    count = len(example_inputs)

    interpreted = _Interpreted(gm)  # node by node, so node meta (recompute tags) reaches the new graph

    def run(*args):
        state = {f"gm.{name}": t for name, t in zip(names, args[count:])}
        return torch.func.functional_call(interpreted, state, tuple(args[:count]), strict=False)

    fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in (*example_inputs, *tensors)]
    with torch.fx.traceback.preserve_node_meta(), fake_mode:
        flat = make_fx(run, pre_dispatch=True)(*fakes)
    return flat, names


class StateReader:
    """Reads tensors of a module tree by dotted name (``"blocks.0.mlp_mhc.alpha"``) at each call,
    from the dict they are registered in: the tensor registered now, even where a wrapper (FSDP2)
    swaps parameter objects between calls."""

    def __init__(self, root: nn.Module, names: list[str]) -> None:
        self.slots = []
        for name in names:
            path, _, attr = name.rpartition(".")
            module = root.get_submodule(path)
            self.slots.append((module._parameters if attr in module._parameters else module._buffers, attr))

    def __call__(self) -> list[torch.Tensor]:
        return [registered[attr] for registered, attr in self.slots]


class _Interpreted(nn.Module):
    """``gm`` run by ``fx.Interpreter``: under ``preserve_node_meta`` each op traced from it
    keeps its node's meta."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return fx.Interpreter(self.gm).run(*args)


def parameter_placeholders(gm: fx.GraphModule, example_inputs: list) -> set[fx.Node]:
    """The placeholders of ``gm`` (traced by :func:`to_aten`) that Dynamo fed a parameter."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n for n, x in zip(placeholders, example_inputs) if isinstance(x, nn.Parameter)}


def describe_inputs(dynamo_gm: fx.GraphModule, example_inputs: list, positional: list[str]) -> dict[str, str]:
    """The tensor inputs of a Dynamo graph (not the module's parameters, buffers or sizes), as
    ``{"input_ids": "int64[2, 8]"}``: what a capture report shows. ``positional`` names the
    forward's positional parameters (Dynamo calls them ``args[i]``)."""
    out = {}
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        arg = node.meta.get("grapharg")
        name = arg.source.name if arg is not None and arg.source is not None else node.name
        if "L['self']" in name or "L__self__" in name or not isinstance(value, torch.Tensor):
            continue
        name = _POSITIONAL.sub(lambda m: positional[int(m[1])] if int(m[1]) < len(positional) else m[0], name)
        name = _SOURCE.sub(r"\1", name)
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            out[name] = f"{dtype}{list(value.shape)}" + ("" if value.device.type == "cpu" else f"@{value.device}")
        else:
            out[name] = repr(value)
    return out


_SOURCE = re.compile(r"^L\['(?:kwargs'\]\[')?([^']*)'\]")
_POSITIONAL = re.compile(r"^L\['args'\]\[(\d+)\]")


def prepare_hf(model: nn.Module, kwargs: dict) -> None:
    """Before a call that asks a Hugging Face model for extra outputs (``output_hidden_states``,
    ``output_attentions``, as an argument or in its config), install transformers' output-capturing
    hooks: transformers installs them lazily inside ``forward``, under a lock Dynamo cannot trace."""
    config = getattr(model, "config", None)
    wanted = any(v for k, v in kwargs.items() if k.startswith("output_")) or any(
        getattr(config, f, False) is True for f in ("output_hidden_states", "output_attentions")
    )
    if not wanted:
        return
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)

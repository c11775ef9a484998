"""Converted models train under torch.distributed (2 CPU processes, gloo): DDP and FSDP2 give the
single-process result on the combined batch; activation checkpointing leaves gradients alone."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import distributed_workers as W
from .conftest import rel_err

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_problem() -> str | None:
    """Why a gloo process group cannot start here, or None (tried with one process)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        return "this torch build has no torch.distributed gloo backend"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.destroy_process_group()
    except Exception as err:  # the platform's networking, sandboxing, ...
        return f"a gloo process group cannot start on this platform ({type(err).__name__}: {err})"
    return None


GLOO_PROBLEM = _gloo_problem()
needs_gloo = pytest.mark.skipif(GLOO_PROBLEM is not None, reason=f"2-process CPU training: {GLOO_PROBLEM}")


def _single_process():
    model = W.converted_gpt()
    losses = torch.stack(W.train(model))
    return losses, W.full_state(model)


@needs_gloo
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_combined_batch(mode, tmp_path):
    out = tmp_path / f"{mode}.pt"
    mp.spawn(W.run, args=(WORLD, _free_port(), mode, str(out)), nprocs=WORLD, join=True)
    result = torch.load(out)
    losses, state = _single_process()
    assert rel_err(result["losses"], losses) <= 1e-5
    assert state.keys() == result["state"].keys()
    for name, p in state.items():
        assert rel_err(result["state"][name], p) <= 1e-5, name
    assert any(rel_err(p, W.converted_gpt().get_parameter(n)) > 1e-3 for n, p in state.items())  # it trained


def test_checkpointed_units_give_the_same_gradients():
    ids, targets = W.batches()[0]
    plain, checkpointed = W.converted_gpt(), W.converted_gpt()
    units = checkpointed.split_units(checkpoint=True)
    assert units == ["blocks.0", "blocks.1"]
    runs = []
    for unit in units:
        checkpointed.get_submodule(unit).forward.train.register_forward_pre_hook(lambda m, a: runs.append(1))
    for model in (plain, checkpointed):
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
    assert len(runs) == 2 * len(units)  # each unit ran forward, then again in backward (recomputed)
    grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-6, name


def test_split_units_keeps_the_function_in_both_modes():
    ids = W.batches()[0][0]
    plain, split = W.converted_gpt(), W.converted_gpt()
    split.split_units()
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        split.train(mode == "train")
        assert torch.equal(split(ids), plain(ids)), mode


def test_split_model_compiles_without_graph_breaks():
    ids = W.batches()[0][0]
    plain, split = W.converted_gpt(), W.converted_gpt()
    split.split_units()
    out = torch.compile(split, backend="aot_eager", fullgraph=True)(ids)
    out.square().mean().backward()
    assert torch.equal(out.detach(), plain(ids).detach())
    assert all(p.grad is not None for p in split.parameters())


def test_split_units_rejects_bad_units():
    model = W.converted_gpt()
    with pytest.raises(AttributeError, match="nothere"):
        model.split_units(["nothere"])
    with pytest.raises(ValueError, match="must not contain one another"):
        model.split_units(["blocks", "blocks.0"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,units",
    [
        ("hf-llama", ["model.layers.0", "model.layers.1"]),
        ("hf-bert", ["encoder.layer.0", "encoder.layer.1"]),
        ("timm-resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
        ("torch-encoder-postnorm", ["layers.0", "layers.1"]),
    ],
)
def test_split_units_with_checkpointing_on_real_models(name, units):
    import mhc_fx

    from .real_models import REAL_MODELS

    build, inputs, _ = REAL_MODELS[name]
    args, kwargs = inputs(2)
    converted = mhc_fx.convert(build(), args, kwargs, sinkhorn_iters=3)
    args, kwargs = inputs(3)

    def step():
        converted.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs (checkpoint replays the RNG)
        out = converted(*args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step()
    assert converted.split_units(checkpoint=True) == units
    calls = []
    for unit in units:
        converted.get_submodule(unit).register_forward_hook(lambda m, a, o: calls.append(m))
    out, grads = step()
    assert len(calls) == len(units)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert rel_err(g, ref_grads[n]) <= 1e-6, n

"""Converted models train under torch.distributed (2 CPU processes, gloo): DDP and FSDP2 (the
whole model as one unit) give the single-process result on the combined batch."""

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
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2_per_layer"])
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
    if mode == "fsdp2_per_layer":  # each block unsharded only for its own region, reduce-scattered in backward
        units = ["blocks.0", "blocks.1"]
        forward = [(e, u) for e, u in result["events"] if e != "post_backward" and u in units]
        assert forward == [(e, u) for u in units for e in ("pre_forward", "post_forward")] * W.STEPS
        backward = [u for e, u in result["events"] if e == "post_backward"]
        assert sorted(backward) == sorted(["", *units] * W.STEPS)

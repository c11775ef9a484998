"""Worker processes of tests/test_distributed.py (a module of its own: spawn imports it)."""

import os

import torch
import torch.distributed as dist

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT

STEPS, BATCH, SEQ, VOCAB, LR = 3, 4, 9, 96, 0.5


def converted_gpt():
    """The same converted tiny GPT (n=4, mHC) in every process."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    model = mhc_fx.convert(TinyGPT(layers=2, dim=32), (ids,), n=4, method="mhc", sinkhorn_iters=4)
    with torch.no_grad():  # away from the function-preserving init, so the mixing matters
        for name, p in model.named_parameters():
            if "_mhc." in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def batches():
    """The combined batches of the run: ``[(ids [BATCH, SEQ], targets [BATCH, SEQ])] * STEPS``."""
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(2)) for _ in range(STEPS)]


def train(model, shard=slice(None)):
    """SGD steps on each batch's ``shard``; returns the losses of the local batches."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for ids, targets in batches():
        logits = model(ids[shard])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[shard].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def full_state(model):
    """name → full parameter (gathers FSDP2 shards; collective)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def record_fsdp_events() -> list[tuple[str, str]]:
    """A list that fills with ``(event, unit)`` as FSDP2's parameter groups unshard for forward,
    reshard after it and reduce-scatter after backward (the unit: its module path, ``""`` for the
    root), and with ``("final_callback", "")`` when the root's end-of-backward callback starts (it
    runs the post-backward of every unit whose autograd hook did not fire)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    events = []

    def recording(name, method, unit):
        def wrapper(self, *args, **kwargs):
            events.append((name, unit(self)))
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("pre_forward", "post_forward", "post_backward"):
        setattr(FSDPParamGroup, name, recording(name, getattr(FSDPParamGroup, name), lambda group: group._module_fqn))
    callback = FSDPState._root_post_backward_final_callback
    FSDPState._root_post_backward_final_callback = recording("final_callback", callback, lambda state: "")
    return events


def run(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = converted_gpt()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import DTensor

            mesh = init_device_mesh("cpu", (world,))
            if mode == "fsdp2_per_layer":  # a unit per block (its connections included), then the rest
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
            unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
            assert not unsharded, f"parameters left out of FSDP2: {unsharded}"
        events = record_fsdp_events() if mode.startswith("fsdp2") else []
        losses = torch.stack(train(wrapped, shard))
        dist.all_reduce(losses)  # the mean over ranks is the combined batch's loss
        state = full_state(model)
        if rank == 0:
            torch.save({"losses": losses / world, "state": state, "events": events}, out)
    finally:
        dist.destroy_process_group()

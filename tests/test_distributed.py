"""Converted models train under torch.distributed (2 CPU processes, gloo): DDP and FSDP2 (the
whole model as one unit, and one unit per block) give the single-process result on the combined
batch; one-process groups check FSDP2 per block against the unsharded model (float64, off init),
with checkpointed blocks, under ``torch.compile``, with mixed precision, and the layouts that raise."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT

from . import distributed_workers as W
from .real_models import REAL_MODELS
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
        backward = [(e, u) for e, u in result["events"] if e in ("post_backward", "final_callback")]
        # each block's gradients reduce-scattered by its own autograd hook, last block first, before
        # the end-of-backward callback (which does the root's: its inputs are token ids)
        expected = [("post_backward", "blocks.1"), ("post_backward", "blocks.0"), ("final_callback", ""), ("post_backward", "")]
        assert backward == expected * W.STEPS


@pytest.fixture
def one_rank():
    """A one-process gloo group: FSDP2's hooks, sharding and collectives run as on many ranks."""
    if GLOO_PROBLEM is not None:
        pytest.skip(f"FSDP2 on CPU: {GLOO_PROBLEM}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}


def _assert_same_training_step(model, ref, ids, tol, call=None):
    """One forward and backward of ``model`` (through ``call``, e.g. its ``torch.compile``
    wrapper) and ``ref`` on ``ids``: logits and every gradient agree."""
    out, expected = (model if call is None else call)(ids), ref(ids)
    assert rel_err(out, expected) <= tol
    out.square().mean().backward()
    expected.square().mean().backward()
    grads, ref_grads = _full_grads(model), _full_grads(ref)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), name
        assert g is None or rel_err(g, ref_grads[name]) <= tol, name


@pytest.mark.parametrize("root_unit", [True, False], ids=["model_sharded", "blocks_only"])
def test_fsdp2_per_layer_equals_the_unsharded_model_in_float64(one_rank, root_unit):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor


    model = W.converted_gpt().double()  # off init
    ref = copy.deepcopy(model)
    ids = torch.randint(0, W.VOCAB, (2, 8))
    model(ids)  # a capture before sharding: never run on the sharded model
    for block in model.blocks:
        fully_shard(block)
    if root_unit:
        fully_shard(model)
    _assert_same_training_step(model, ref, ids, 1e-10)
    assert all(isinstance(p, DTensor) for p in model.blocks[1].parameters())  # resharded after its region
    model.zero_grad(), ref.zero_grad()
    _assert_same_training_step(model, ref, ids[:1, :1], 1e-10)  # batch 1, length 1: a new capture
    for m in (model, ref):  # partly frozen (as under LoRA): a new capture, no gradient for the frozen
        m.blocks[0].mlp.requires_grad_(False)
        m.zero_grad(set_to_none=True)
    _assert_same_training_step(model, ref, ids, 1e-10)
    assert "FSDP2 units" in str(mhc_fx.report(model).captures[-1])


#: real models and the modules to shard one by one: Hugging Face decoder layers, timm stages of several blocks
REAL_LAYERS = {"hf-llama": "model.layers", "timm-convnext_atto": "stages"}


@pytest.mark.parametrize("name", list(REAL_LAYERS))
def test_fsdp2_per_layer_real_models(one_rank, name):
    from torch.distributed.fsdp import fully_shard

    make, inputs, _ = REAL_MODELS[name]
    args, kwargs = inputs(2)
    model = mhc_fx.convert(make().eval(), args, kwargs, n=4).double()  # eval: no dropout
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "_mhc." in n:
                p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model)
    for layer in model.get_submodule(REAL_LAYERS[name]):
        fully_shard(layer)
    fully_shard(model)
    args = [a.double() if a.is_floating_point() else a for a in args]

    def first_output(m):
        out = m(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]

    out, expected = first_output(model), first_output(ref)
    assert rel_err(out, expected) <= 1e-10
    out.square().mean().backward()
    expected.square().mean().backward()
    grads, ref_grads = _full_grads(model), _full_grads(ref)
    for n, g in ref_grads.items():
        if g is not None:
            assert rel_err(grads[n], g) <= 1e-10, n


def test_fsdp2_per_layer_with_checkpointed_blocks(one_rank):
    """FSDP2 per block and ``torch.utils.checkpoint`` per block, as large models train: the same
    step as the plain converted model, with less saved for backward."""
    from torch.distributed.fsdp import fully_shard

    from mhc_fx.memory import saved_bytes

    from .test_checkpointing import Net, off_init

    torch.manual_seed(0)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    model = mhc_fx.convert(Net().eval(), x.float(), n=4, sinkhorn_iters=4).double()  # eval: no dropout
    ref = copy.deepcopy(model)
    off_init(model, ref)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    plain = saved_bytes(lambda: model(x))
    model.checkpointed = True
    _assert_same_training_step(model, ref, x, 1e-10)
    assert saved_bytes(lambda: model(x)) < plain


def test_fsdp2_per_layer_under_torch_compile(one_rank):
    """``torch.compile(model, backend=B)`` of a model with FSDP2 units hands each region to ``B``."""
    from torch.distributed.fsdp import fully_shard


    model = W.converted_gpt().double()
    ref = copy.deepcopy(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    ids = torch.randint(0, W.VOCAB, (2, 8))
    _assert_same_training_step(model, ref, ids, 1e-10, call=torch.compile(model, backend="aot_eager"))
    assert "[aot_eager, FSDP2 units blocks.0, blocks.1]" in str(mhc_fx.report(model).captures[-1])


def test_fsdp2_per_layer_mixed_precision(one_rank):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: the layers are captured with the parameters
    FSDP2 gathers (bfloat16), as the model cast to bfloat16 computes them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = W.converted_gpt()
    ref = copy.deepcopy(model).to(torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    ids = torch.randint(0, W.VOCAB, (2, 8))
    out = model(ids)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref(ids)) <= 2e-2
    out.float().square().mean().backward()
    grads = _full_grads(model)
    assert all(g.dtype == torch.float32 and g.norm() > 0 for n, g in grads.items() if "_mhc." in n)


class BufferBlock(nn.Module):
    """A residual block with a float32 statistic updated in place in training (FSDP2 never casts buffers)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)
        self.register_buffer("running", torch.zeros(d))

    def forward(self, x):
        if self.training:
            self.running.mul_(0.9).add_(0.1 * x.detach().float().mean((0, 1)))
        return x + self.fc(self.ln(x)) * (1 + self.running).to(x.dtype)


class TransposedHead(nn.Module):
    """A unit with no residual block whose parameter is read through a view (``w.t()``)."""

    def __init__(self, d=32, out=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(out, d) / d**0.5)

    def forward(self, x):
        return x @ self.w.t()


class BufferNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(BufferBlock() for _ in range(2))
        self.head = TransposedHead()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _converted_buffer_net() -> nn.Module:
    torch.manual_seed(0)
    model = mhc_fx.convert(BufferNet(), torch.randn(2, 6, 32), n=4, sinkhorn_iters=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "_mhc." in n:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _shard_buffer_net(model, **options):
    from torch.distributed.fsdp import fully_shard

    for module in [*model.blocks, model.head]:
        fully_shard(module, **options)
    fully_shard(model, **options)


def test_fsdp2_unit_without_blocks_reads_a_parameter_view(one_rank):
    """``fully_shard(model.head)`` with ``x @ w.t()``: the transpose runs inside the head's region,
    while its parameter is gathered."""
    model = _converted_buffer_net().double()
    ref = copy.deepcopy(model)
    _shard_buffer_net(model)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    _assert_same_training_step(model, ref, x, 1e-10)
    assert torch.equal(model.blocks[1].running, ref.blocks[1].running) and model.blocks[1].running.norm() > 0


def test_fsdp2_per_layer_casts_only_the_layers_arguments(one_rank):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: FSDP2 casts each layer's floating-point
    arguments, not its float32 buffers, which a block updates in place. Oracle: the converted
    model with bfloat16 parameters, float32 buffers and the same cast as a pre-hook per unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = _converted_buffer_net()
    ref = copy.deepcopy(model)
    _shard_buffer_net(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))

    def cast_floats(module, args, kwargs):
        cast = lambda t: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}

    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(torch.bfloat16)
    for module in [ref, *ref.blocks, ref.head]:
        module.register_forward_pre_hook(cast_floats, with_kwargs=True)
    x = torch.randn(2, 6, 32)
    out, expected = model(x), ref(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 1e-2
    for block, ref_block in zip(model.blocks, ref.blocks):
        assert block.running.dtype == torch.float32 and block.running.norm() > 0
        assert rel_err(block.running, ref_block.running) <= 1e-2
    out.float().square().mean().backward()
    assert all(g is not None and g.norm() > 0 for n, g in _full_grads(model).items() if "_mhc." in n)


def test_fsdp2_unit_layouts_that_are_clear_errors(one_rank):
    from torch.distributed.fsdp import fully_shard


    ids = torch.randint(0, W.VOCAB, (2, 8))
    nested = W.converted_gpt()
    fully_shard(nested.blocks[0].mlp)
    fully_shard(nested.blocks[0])
    with pytest.raises(mhc_fx.CaptureError, match=r"unit blocks.0.mlp is nested in unit blocks.0.*Fix"):
        nested(ids)
    grouped = W.converted_gpt()
    fully_shard([grouped.blocks[0], grouped.blocks[1]])
    with pytest.raises(mhc_fx.CaptureError, match=r"unit of 2 modules.*fully_shard each module on its own"):
        grouped(ids)
    sharded_first = TinyGPT(layers=2, dim=32)
    for block in sharded_first.blocks:
        fully_shard(block)
    with pytest.raises(mhc_fx.ConversionError, match=r"already sharded by FSDP2 \(units: blocks.0, blocks.1\).*Fix: convert the model first"):
        mhc_fx.convert(sharded_first, (ids,))

"""Activation checkpointing per block in a converted model: ``torch.utils.checkpoint`` around a
block (reentrant or not) and Hugging Face's ``gradient_checkpointing_enable``. The blocks inside
checkpointed regions are converted, their connections recomputed with them, and the result and
every gradient equal the same converted model without checkpointing, off init."""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import mhc_fx
from mhc_fx.memory import saved_bytes

from .real_models import REAL_MODELS


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln, self.fc, self.out, self.drop = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(self.out(torch.relu(self.fc(self.ln(x)))))


class Net(nn.Module):
    """Three residual blocks, each run through ``torch.utils.checkpoint`` when ``checkpointed``."""

    def __init__(self, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(32, 5)
        self.checkpointed, self.reentrant, self.context_fn = False, False, None

    def forward(self, x):
        for block in self.blocks:
            if not self.checkpointed:
                x = block(x)
            elif self.context_fn is not None:
                x = checkpoint(block, x, use_reentrant=False, context_fn=self.context_fn)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def off_init(*models):
    """The same random step off the connections' init in every model (each a copy of the first)."""
    torch.manual_seed(3)
    named = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in named[0].items():
            if "_mhc." in name:
                step = 0.3 * torch.randn_like(p)
                for params in named:
                    params[name].add_(step)


def train_call(model, call):
    """Output and every parameter gradient of one training forward/backward (dropout seeded)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = call(model)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=0.0):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert (out_a - out_b).abs().max() <= tol
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for k in grads_a:
        assert (grads_a[k] - grads_b[k]).abs().max() <= tol * max(1.0, grads_a[k].abs().max()), k


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_convert_and_train_as_without_checkpointing(reentrant):
    x = torch.randn(4, 16, 32)
    torch.manual_seed(0)
    plain = mhc_fx.convert(Net(), (torch.randn(2, 8, 32),))  # trained below at another batch and length
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed, checkpointed.reentrant = True, reentrant
    off_init(plain, checkpointed)
    assert_same(train_call(plain, lambda m: m(x)), train_call(checkpointed, lambda m: m(x)))
    assert mhc_fx.report(checkpointed).num_blocks == 3
    # the blocks and their connections are recomputed in backward, not saved
    assert saved_bytes(checkpointed, x) < 0.3 * saved_bytes(plain, x)


def test_blocks_checkpointed_before_converting_are_found():
    x = torch.randn(2, 8, 32)
    torch.manual_seed(0)
    model = Net()
    model.checkpointed = True
    converted = mhc_fx.convert(model, (x,))
    assert mhc_fx.report(converted).num_blocks == 3
    converted.checkpointed = False  # a new capture, rewritten with the same connections
    reference = copy.deepcopy(converted)
    converted.checkpointed = True
    off_init(converted, reference)
    assert_same(train_call(reference, lambda m: m(x)), train_call(converted, lambda m: m(x)))


def test_selective_checkpointing_with_a_policy_is_a_clear_error():
    x = torch.randn(2, 8, 32)
    model = mhc_fx.convert(Net(), (x,))
    model.checkpointed = True
    model.context_fn = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    with pytest.raises(mhc_fx.CaptureError, match="context_fn"):
        model.train()(x)


def test_checkpointed_model_under_backend_mhc_matches_eager():
    x = torch.randn(2, 8, 32)
    torch.manual_seed(0)
    eager = mhc_fx.convert(Net(), (x,))
    for block in eager.blocks:
        block.drop.p = 0.0  # compiled dropout draws other numbers than eager
    eager.checkpointed = True
    compiled = copy.deepcopy(eager)
    off_init(eager, compiled)
    run = torch.compile(compiled, backend="mhc")
    assert_same(train_call(eager, lambda m: m(x)), train_call(compiled, lambda m: run(x)), tol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hugging_face_gradient_checkpointing(name, reentrant):
    factory, example, _ = REAL_MODELS[name]
    args, kwargs = example(2)
    plain = mhc_fx.convert(factory(), args, kwargs)
    checkpointed = copy.deepcopy(plain)
    off_init(plain, checkpointed)

    def call(m):
        return m(*args, **kwargs).logits

    before = saved_bytes(lambda: call(checkpointed.train()))  # a train capture without checkpointing
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    switches = _context_switch_states()
    assert switches  # transformers' own, and kernels' where transformers uses it
    assert_same(train_call(plain, call), train_call(checkpointed, call))
    assert saved_bytes(lambda: call(checkpointed)) < 0.6 * before
    captures = mhc_fx.report(checkpointed).captures
    assert len(captures) >= 3 and captures[-1].training
    # the context switches set and reset inside the checkpointed layers hold what they held before
    assert _context_switch_states() == switches


def _context_switch_states():
    """The module-level instances of the known context switches (transformers' and kernels'
    ``CompileableContextVar``) with their attributes: what a call must leave as it found it."""
    import sys

    from mhc_fx.convert.context_switches import CONTEXT_SWITCH_CLASSES

    states = {}
    for module, name in CONTEXT_SWITCH_CLASSES:
        namespace = vars(sys.modules[module]) if module in sys.modules else {}
        for attr, value in namespace.items():
            if isinstance(value, namespace[name]):
                states[f"{module}.{attr}"] = {k: v for k, v in vars(value).items() if k != "context_var"}
    return states


class CountingBlock(Block):
    """A block that counts its calls on the model: a side effect a checkpointed region cannot hide."""

    def __init__(self, owner):
        super().__init__()
        self.owner = [owner]  # not a submodule

    def forward(self, x):
        self.owner[0].calls += 1
        return super().forward(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_other_side_effects_in_checkpointed_blocks_are_a_clear_error(reentrant):
    x = torch.randn(2, 8, 32)
    model = Net()
    model.calls = 0
    model.blocks = nn.ModuleList(CountingBlock(model) for _ in range(3))
    model = mhc_fx.convert(model, (x,))
    model.checkpointed, model.reentrant = True, reentrant
    with pytest.raises(mhc_fx.CaptureError, match="calls.*skip_fwd_side_effects_in_bwd_under_checkpoint"):
        model.train()(x)
    # with Dynamo's opt-in the mutation runs once per block and call (not again in backward)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        model.calls = 0
        model(x).sum().backward()
    assert model.calls == 3

"""Converted models train, switch modes, and round-trip their state."""

import pytest
import torch

import mhc_fx
from mhc_fx.nn import Connection
from mhc_fx.demo.zoo import TinyGPT

from .conftest import rel_err


def _batch(batch=8, seq=32, vocab=96):
    ids = torch.randint(0, vocab, (batch, seq + 1))
    return ids[:, :-1], ids[:, 1:]


def _train(model, steps, lr=3e-3):
    opt = torch.optim.AdamW(mhc_fx.param_groups(model, 0.1), lr=lr)
    torch.manual_seed(1)
    data = [_batch() for _ in range(4)]
    losses = []
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["mhc", "hc"])
def test_converted_gpt_trains_and_streams_separate(method):
    model = mhc_fx.convert(TinyGPT(layers=2, dim=32), (_batch()[0],), n=4, method=method)
    new = {name: p for name, p in model.named_parameters() if "_mhc." in name or "_hc." in name}
    assert new
    before = {name: p.detach().clone() for name, p in new.items()}
    losses = _train(model, 50)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for name, p in new.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name

    # after training the streams differ: the stream entering the last block is not n copies
    captured = {}
    last = [m for m in model.modules() if isinstance(m, Connection)][-1]
    hook = last.register_forward_pre_hook(lambda mod, inp: captured.update(X=inp[0]))
    with torch.no_grad():
        model.eval()(_batch()[0])
    hook.remove()
    X = captured["X"]  # [B, T, n, C]
    spread = (X - X.mean(-2, keepdim=True)).norm() / X.norm()
    assert spread > 1e-3


def test_eval_is_deterministic_and_train_uses_dropout():
    model = TinyGPT(layers=2, dim=32, dropout=0.3)
    ids = _batch()[0]
    converted = mhc_fx.convert(model, (ids,))
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(ids), converted(ids))
        assert rel_err(converted(ids), model.eval()(ids)) <= 1e-5
    converted.train()
    with torch.no_grad():
        assert not torch.equal(converted(ids), converted(ids))


def test_state_dict_round_trip():
    ids = _batch()[0]
    trained = mhc_fx.convert(TinyGPT(layers=2, dim=32), (ids,))
    _train(trained, 5)
    fresh = mhc_fx.convert(TinyGPT(layers=2, dim=32), (ids,))
    missing, unexpected = fresh.load_state_dict(trained.state_dict())
    assert not missing and not unexpected
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), trained.eval()(ids))


def test_parameters_are_listed_once():
    converted = mhc_fx.convert(TinyGPT(layers=1, dim=32), (_batch()[0],))
    names = [n for n, _ in converted.named_parameters()]
    assert len(names) == len(set(names)) == len(converted.state_dict())


def test_param_groups_keep_static_mixing_out_of_weight_decay():
    converted = mhc_fx.convert(TinyGPT(layers=1, dim=32), (_batch()[0],), method="hc")
    decay, no_decay = mhc_fx.param_groups(converted, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    static = {id(p) for m in converted.modules() if isinstance(m, Connection) for n, p in m.named_parameters() if n.endswith("_static")}
    assert static and static <= {id(p) for p in no_decay["params"]}
    assert not static & {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(converted.parameters()))


def test_an_argument_forward_does_not_take_is_the_usual_type_error():
    converted = mhc_fx.convert(TinyGPT(layers=1), (_batch()[0],))
    with pytest.raises(TypeError, match="labels"):
        converted(_batch()[0], labels=_batch()[1])


def test_compiled_with_another_backend_runs_the_converted_function():
    ids = _batch()[0]
    converted = mhc_fx.convert(TinyGPT(layers=1, dim=32), (ids,))
    compiled = torch.compile(converted, backend="aot_eager")
    out = compiled(ids)
    assert mhc_fx.report(converted).captures[-1].backend == "aot_eager"  # the outer backend ran the capture
    out.square().mean().backward()
    assert torch.equal(out.detach(), converted(ids).detach())
    assert all(p.grad is not None for p in converted.parameters())


def test_bfloat16_model_stays_close_to_the_bfloat16_original():
    ids = _batch()[0]
    model = TinyGPT(layers=1, dim=32).eval()
    converted = mhc_fx.convert(model, (ids,)).to(torch.bfloat16).eval()
    with torch.no_grad():
        out, ref = converted(ids), model.to(torch.bfloat16)(ids)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 2e-2

"""Amax-gain diagnostics against a direct computation, and mHC's bounded mixing."""

import torch

import mhc_fx
from mhc_fx.diagnostics import backward_gain, composite, forward_gain, gradient_norms, mixing_stats
from mhc_fx.demo.zoo import TinyGPT


def test_gains_of_a_hand_made_chain():
    H1 = torch.tensor([[[2.0, -1.0], [0.5, 0.5]]])
    H2 = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])
    assert torch.allclose(forward_gain(H1), torch.tensor([3.0]))  # rows |2|+|-1|, 1
    assert torch.allclose(backward_gain(H1), torch.tensor([2.5]))  # columns 2.5, 1.5
    P = composite([H1, H2])
    direct = H2[0] @ H1[0]  # [[2.5, -0.5], [1.5, 1.5]]
    assert torch.allclose(P[1][0], direct)
    assert torch.allclose(forward_gain(P[1]), torch.tensor([3.0]))
    assert torch.allclose(backward_gain(P[1]), torch.tensor([4.0]))


def _trained(method):
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (4, 16))
    model = mhc_fx.convert(TinyGPT(layers=3, dim=32), (ids,), method=method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = model(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, ids


def test_mhc_forward_gain_is_one_and_composite_bounded():
    model, ids = _trained("mhc")
    stats = mixing_stats(model.eval(), ids)
    assert len(stats) == 6 and [s.index for s in stats] == list(range(6))
    for s in stats:
        assert abs(s.forward_gain - 1) <= 1e-5  # rows of a Sinkhorn projection sum to 1
        assert s.composite_forward_gain <= 2 and s.composite_backward_gain <= 2
        assert 0 < s.h_pre[1] and s.h_pre[2] < 1 and 0 < s.h_post[1] and s.h_post[2] < 2


def test_stats_match_the_connection_coefficients():
    model, ids = _trained("hc")
    stats = mixing_stats(model.eval(), ids)
    conns = [model.get_submodule(b.module) for b in mhc_fx.report(model).blocks]
    captured = []
    hook = conns[0].register_forward_hook(lambda m, i, o: captured.append(o[2]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    H_res = captured[0].reshape(-1, 4, 4)
    assert abs(stats[0].forward_gain - float(forward_gain(H_res).mean())) <= 1e-6
    assert abs(stats[0].composite_forward_gain - stats[0].forward_gain) <= 1e-6  # first block


def test_gradient_norms_per_block():
    model, ids = _trained("mhc")
    model(ids).logsumexp(-1).mean().backward()
    norms = gradient_norms(model)
    assert set(norms) >= {b.module for b in mhc_fx.report(model).blocks} | {b.name for b in mhc_fx.report(model).blocks}
    assert all(v > 0 for v in norms.values())

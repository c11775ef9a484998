"""The ``mhc`` backend fuses mHC in DeepSeek-V4's form (DESIGN §2 "Forms", §5): Hugging Face's
``DeepseekV4ForCausalLM`` as it ships, and a hand-written connection of the same function in
other spellings, with every connection fused, eager's loss and gradients (against a float64
run), eval logits and generated tokens; a connection with its epsilons elsewhere stays unfused
with the reason."""

import copy

import pytest
import torch
from torch import nn

import mhc_fx

from .conftest import rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")


def _tiny_deepseek_v4(layers=2, iters=3):
    """A random DeepseekV4ForCausalLM small enough to compile on CPU, its connections and head off init."""
    config = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, o_lora_rank=16, o_groups=1, n_routed_experts=4,
        num_experts_per_tok=2, index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=8,
        hc_sinkhorn_iters=iters, max_position_embeddings=64, qk_rope_head_dim=8, pad_token_id=63, eos_token_id=62,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("fn", "hc_fn"):
                p.normal_(0.0, 0.3)
            elif leaf in ("base", "hc_base"):
                p.normal_(0.0, 0.5)
            elif leaf in ("scale", "hc_scale"):
                p.uniform_(0.5, 1.5)
    return model


def _loss_and_grads(model, fn, *args, **kwargs):
    model.zero_grad()
    loss = fn(*args, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_within_four_times_eager(got, eager, exact, what):
    """``got`` is as close to the float64 ``exact`` as eager float32 is, within 4× (and float32 rounding)."""
    bound = 4 * rel_err(eager, exact) + 1e-6
    assert rel_err(got, exact) <= bound, f"{what}: {rel_err(got, exact):.2e} > {bound:.2e}"


def _connections(model) -> set[str]:
    return {name for name, m in model.named_modules() if type(m).__name__ == "DeepseekV4HyperConnection"}


@pytest.fixture(scope="module")
def deepseek_v4():
    model = _tiny_deepseek_v4()
    exact = copy.deepcopy(model).double()
    # the float64 oracle loops over its experts: grouped_mm has no float64 (the model under test
    # keeps grouped_mm, whose graphs Dynamo captures whole)
    exact.set_experts_implementation("eager")
    return model, exact, torch.randint(0, 60, (2, 12))


def test_every_hugging_face_deepseek_v4_connection_fuses_with_eager_loss_and_gradients(deepseek_v4):
    model, exact, ids = deepseek_v4
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="mhc")
    loss, grads = _loss_and_grads(compiled_model, lambda: compiled(ids, labels=ids).loss)
    eager_loss, eager_grads = _loss_and_grads(model, lambda: model(ids, labels=ids).loss)
    exact_loss, exact_grads = _loss_and_grads(exact, lambda: exact(ids, labels=ids).loss)
    _assert_within_four_times_eager(loss, eager_loss, exact_loss, "loss")
    # parameters the float64 run leaves without a gradient (unused at this length) get zeros at most
    assert set(exact_grads) <= set(grads) and all(not grads[k].any() for k in set(grads) - set(exact_grads))
    for name in exact_grads:
        _assert_within_four_times_eager(grads[name], eager_grads[name], exact_grads[name], f"gradient of {name}")
    (report,) = mhc_fx.fusion_reports(compiled_model)
    # every connection's pre side fused, each by name; its mixing fused with the next one's pre
    assert {f.owner for f in report.fused if f.kind in ("pre", "post_res_pre")} == _connections(model)
    assert report.num_pre == report.num_post_res == len(_connections(model)) == 4, str(report)
    assert report.counts["post_res_pre"] == 3 and not report.unfused, str(report)
    assert {f.form for f in report.fused} == {"deepseek_v4"} and "forms: deepseek_v4 ×4" in str(report)


def test_deepseek_v4_eval_logits_and_generated_tokens_are_eagers(deepseek_v4):
    model, exact, ids = deepseek_v4
    model, exact = copy.deepcopy(model).eval(), exact.eval()
    compiled = copy.deepcopy(model)
    compiled.compile(backend="mhc")  # in place: generate() calls the compiled forward
    with torch.no_grad():
        logits = compiled(ids).logits
        _assert_within_four_times_eager(logits, model(ids).logits, exact(ids).logits, "eval logits")
        prompt = ids[:, :5]
        tokens = compiled.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False)
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False)
    assert torch.equal(tokens, expected)
    reports = mhc_fx.fusion_reports(compiled)
    assert len(reports) >= 2 and all(r.num_pre == r.num_post_res == 4 for r in reports), "\n".join(map(str, reports))


class HandWrittenDeepSeekV4(nn.Module):
    """DeepSeek-V4's connections spelled otherwise: the projection an einsum with ``fn [K, nC]``,
    the softmax as ``exp(x − rowmax) / rowsum``, the transposed mixing folded into an einsum
    over the first axis of ``comb``. ``eps_after_division`` adds the epsilon after each
    division instead of to its denominator (a close function, not DeepSeek-V4's)."""

    def __init__(self, n=4, channels=32, layers=2, iters=3, eps=1e-6, eps_after_division=False):
        super().__init__()
        K = n * n + 2 * n
        self.n, self.iters, self.eps, self.eps_after_division = n, iters, eps, eps_after_division
        self.fn = nn.ParameterList([nn.Parameter(0.3 * torch.randn(K, n * channels)) for _ in range(layers)])
        self.base = nn.ParameterList([nn.Parameter(0.5 * torch.randn(K)) for _ in range(layers)])
        self.scale = nn.ParameterList([nn.Parameter(torch.rand(3) + 0.5) for _ in range(layers)])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(channels, 64), nn.GELU(), nn.Linear(64, channels)) for _ in range(layers)])

    def _normalise(self, comb, dim):
        if self.eps_after_division:
            return comb / comb.sum(dim=dim, keepdim=True) + self.eps
        return comb / (comb.sum(dim=dim, keepdim=True) + self.eps)

    def connection(self, i, X):
        n, eps = self.n, self.eps
        v = X.flatten(-2).to(torch.promote_types(X.dtype, torch.float32))
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        mix = torch.einsum("btk,jk->btj", v, self.fn[i])
        pre, post, comb = mix.split([n, n, n * n], dim=-1)
        base, scale = self.base[i], self.scale[i]
        pre = torch.sigmoid(pre * scale[0] + base[:n]) + eps
        post = 2 * torch.sigmoid(post * scale[1] + base[n : 2 * n])
        logits = (comb * scale[2] + base[2 * n :]).unflatten(-1, (n, n))
        e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        comb = e / e.sum(dim=-1, keepdim=True) + eps
        comb = self._normalise(comb, -2)
        for _ in range(self.iters - 1):
            comb = self._normalise(self._normalise(comb, -1), -2)
        return torch.einsum("btj,btjc->btc", pre, X), post, comb

    def forward(self, x):
        X = x.unsqueeze(-2).expand(-1, -1, self.n, -1).contiguous()
        for i, block in enumerate(self.blocks):
            h, post, comb = self.connection(i, X)
            y = block(h)
            X = torch.einsum("btjk,btjc->btkc", comb, X) + post.unsqueeze(-1) * y.unsqueeze(-2)
        return X.sum(dim=-2)


def test_deepseek_v4_connection_spelled_otherwise_fuses_with_eager_gradients():
    torch.manual_seed(0)
    model = HandWrittenDeepSeekV4()
    exact = copy.deepcopy(model).double()
    x = torch.randn(2, 7, 32)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="mhc")
    out, grads = _loss_and_grads(compiled_model, lambda: compiled(x).square().mean())
    eager, eager_grads = _loss_and_grads(model, lambda: model(x).square().mean())
    ref, ref_grads = _loss_and_grads(exact, lambda: exact(x.double()).square().mean())
    _assert_within_four_times_eager(out, eager, ref, "loss")
    for name in ref_grads:
        _assert_within_four_times_eager(grads[name], eager_grads[name], ref_grads[name], f"gradient of {name}")
    (report,) = mhc_fx.fusion_reports(compiled_model)
    assert report.num_pre == report.num_post_res == 2 and not report.unfused, str(report)


def test_epsilons_placed_otherwise_are_left_unfused_with_the_reason():
    torch.manual_seed(0)
    model = HandWrittenDeepSeekV4(eps_after_division=True)
    compiled = torch.compile(model, backend="mhc")
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(compiled(x), model(x))
    (report,) = mhc_fx.fusion_reports(model)
    assert report.num_pre == 0 and len(report.unfused) == 2, str(report)
    assert all("put their epsilons where no form of mHC does" in u.reason for u in report.unfused), str(report)

"""A converted model stays the user's model: in place, same classes, hooks, casts, other shapes
and flags re-captured, pickle/deepcopy, Hugging Face generate/save_pretrained/Trainer/PEFT, any
torch.compile backend — and, off init, the n-stream function written out here from docs/math.md."""

import copy
import io

import pytest
import torch
from torch import nn

import mhc_fx
from mhc_fx.nn import functional as MF

from .conftest import rel_err


class Stack(nn.Module):
    """x_{k+1} = x_k + W2_k tanh(W1_k LN(x_k)), then a head."""

    def __init__(self, dim=16, layers=3):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.ups = nn.ModuleList([nn.Linear(dim, 2 * dim) for _ in range(layers)])
        self.downs = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(layers)])
        self.head = nn.Linear(dim, 5)

    def branch(self, k, x):
        return self.downs[k](torch.tanh(self.ups[k](self.norms[k](x))))

    def forward(self, x):
        for k in range(len(self.ups)):
            x = x + self.branch(k, x)
        return self.head(x)


def _off_init(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_mhc." in name or ".mhc." in name:
                p.add_(0.3 * torch.randn_like(p))


def _n_streams(x, conns, branches, n):
    """The n-stream forward from docs/math.md: expand ``x [..., C]`` to n streams, then per block
    the mHC coefficients, h = H_pre·X, y = F(h), X = H_res·X + H_postᵀ·y; the mean at the end.
    ``conns``: the blocks' connection modules; ``branches``: their branch functions F."""
    X = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    for conn, branch in zip(conns, branches, strict=True):
        H_pre, H_post, H_res = MF.mhc_coefficients(X, conn.phi, conn.alpha, conn.bias, sinkhorn_iters=conn.sinkhorn.iters, eps=conn.eps)
        h = (H_pre.unsqueeze(-1) * X).sum(-2)
        y = branch(h)
        X = (H_res @ X) + H_post.unsqueeze(-1) * y.unsqueeze(-2)
    return X.mean(-2)


def _oracle(ref, conns, x, n):
    """:func:`_n_streams` of the hand-built ``Stack`` in float64 (``ref``: a float64 copy of the
    converted model, for its branches; ``conns``: its connections)."""
    branches = [lambda h, k=k: ref.branch(k, h) for k in range(len(conns))]
    return ref.head(_n_streams(x.double(), conns, branches, n))


def _gpt2_oracle(ref, conns, ids, n):
    """:func:`_n_streams` of a Hugging Face GPT-2 (eval): embeddings, per layer the attention and
    the MLP branch (each after its own LayerNorm), then ln_f and the LM head."""
    tr = ref.transformer
    x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))
    branches = []
    for block in tr.h:
        branches += [lambda h, b=block: b.attn(b.ln_1(h))[0], lambda h, b=block: b.mlp(b.ln_2(h))]
    return ref.lm_head(tr.ln_f(_n_streams(x, conns, branches, n)))


def test_off_init_matches_an_n_stream_loop_written_from_the_math():
    model = Stack()
    x = torch.randn(2, 5, 16)
    mhc_fx.convert(model, (x,), n=4, sinkhorn_iters=7)
    _off_init(model)
    oracle_model = copy.deepcopy(model).double()
    conns = [oracle_model.get_submodule(b.module) for b in mhc_fx.report(model).blocks]
    assert len(conns) == 3
    for shape in [(2, 5, 16), (1, 1, 16), (3, 7, 16)]:
        x = torch.randn(shape)
        out = model(x)
        assert rel_err(out, _oracle(oracle_model, conns, x, 4)) <= 1e-5, shape
    # gradients against the float64 oracle
    x = torch.randn(2, 5, 16)
    model(x).square().sum().backward()
    oracle_model.zero_grad()
    _oracle(oracle_model, conns, x, 4).square().sum().backward()
    ref_grads = dict(oracle_model.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[name].grad) <= 1e-4, name


def test_off_init_gpt2_matches_an_n_stream_loop_written_from_the_math():
    pytest.importorskip("transformers")
    from .real_models import REAL_MODELS

    factory, example, _ = REAL_MODELS["hf-gpt2"]
    model = factory().eval()
    ids = example(2)[1]["input_ids"]
    original = copy.deepcopy(model)
    mhc_fx.convert(model, (), {"input_ids": ids, "use_cache": False}, n=4, sinkhorn_iters=7)
    conns = [model.get_submodule(b.module) for b in mhc_fx.report(model).blocks]
    assert len(conns) == 4  # attention and MLP of 2 layers
    with torch.no_grad():  # the oracle is the original model's function at init (checks the oracle)
        assert rel_err(_gpt2_oracle(original, conns, ids, 4), original(ids).logits) <= 1e-5
    _off_init(model)
    with torch.no_grad():
        for batch, length in [(2, 12), (1, 1), (3, 5)]:
            ids = torch.randint(0, 128, (batch, length))
            out = model(input_ids=ids, use_cache=False).logits
            ref = _gpt2_oracle(model, conns, ids, 4)
            assert rel_err(out, ref) <= 1e-5, (batch, length)
            assert rel_err(out, original(ids).logits) > 1e-2  # off init: another function


def test_in_place_same_classes_hooks_modes_and_casts():
    model = Stack().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(1, 1, 16)  # a length-1, batch-1 example: other sizes must re-capture
    assert mhc_fx.convert(model, (x,)) is model and type(model) is Stack
    assert [type(m) for m in model.ups] == [nn.Linear] * 3 and isinstance(model.norms, nn.ModuleList)
    seen = []
    model.downs[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    for shape in [(1, 6, 16), (4, 3, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(model(x), ref(x)) <= 1e-5, shape
    assert seen == [(1, 6, 16), (4, 3, 16)]
    x = torch.randn(2, 4, 16)
    b, rb = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    assert rel_err(b(x.bfloat16()), rb(x.bfloat16())) <= 2e-2
    d, rd = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
    assert rel_err(d(x.double()), rd(x.double())) <= 1e-10
    reasons = [c.reason for c in mhc_fx.report(model).captures]
    assert reasons[0] == "first call" and any("x float32[1, 1, 16] → float32[1, 6, 16]" in r for r in reasons)


def test_pickle_and_deepcopy_round_trip():
    model = Stack()
    x = torch.randn(2, 5, 16)
    mhc_fx.convert(model, (x,))
    _off_init(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert other.forward.model is other and mhc_fx.is_converted(other)
        assert torch.equal(other(x), model(x))


def test_frozen_model_converts_the_same_blocks():
    x = torch.randn(2, 5, 16)
    trainable = mhc_fx.find_residuals(Stack(), (x,)).num_blocks
    frozen = Stack().requires_grad_(False)
    assert mhc_fx.find_residuals(frozen, (x,)).num_blocks == trainable == 3


def test_default_torch_compile_off_init_equals_eager():
    model = Stack()
    x = torch.randn(2, 5, 16)
    mhc_fx.convert(model, (x,))
    _off_init(model)
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert rel_err(compiled, eager) <= 1e-5
    assert mhc_fx.report(model).captures[-1].backend == "inductor"


def test_a_call_whose_blocks_differ_from_the_plan_raises_naming_the_block():
    class Optional(Stack):
        def forward(self, x, skip_last=False):
            for k in range(len(self.ups) - (1 if skip_last else 0)):
                x = x + self.branch(k, x)
            return self.head(x)

    model = Optional()
    x = torch.randn(2, 5, 16)
    mhc_fx.convert(model, (x,))
    with pytest.raises(mhc_fx.ConversionError, match=r"planned but not in this call's graph"):
        model(x, skip_last=True)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_hf_generate_hidden_states_save_and_load(tmp_path):
    model = _llama()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 6))
    mhc_fx.convert(model, example_kwargs={"input_ids": ids})
    prompt = ids[:1, :3]
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                       ref.generate(prompt, max_new_tokens=5, do_sample=False))
    _off_init(model)
    tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
    greedy = prompt
    for _ in range(4):  # the same tokens as full forwards without a cache
        nxt = model(input_ids=greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, nxt], 1)
    assert torch.equal(tokens, greedy)
    model.save_pretrained(tmp_path)
    loaded = mhc_fx.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3


@pytest.mark.slow
def test_hf_trainer_with_default_arguments_and_peft_lora(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _llama().train()
    ids = torch.randint(0, 64, (2, 6))
    mhc_fx.convert(model, example_kwargs={"input_ids": ids})
    data = [{"input_ids": torch.randint(0, 64, (6,)), "labels": torch.randint(0, 64, (6,))} for _ in range(6)]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[])
    before = model.model.layers[0].mlp_mhc.phi.detach().clone()
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[0].mlp_mhc.phi)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    lora(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # lora_B starts at 0, so A's is 0


@pytest.mark.slow
def test_lora_then_convert_converts_every_block():
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 64, (2, 6))
    plain = mhc_fx.find_residuals(_llama(), example_kwargs={"input_ids": ids}).num_blocks
    lora = peft.get_peft_model(_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    assert mhc_fx.find_residuals(lora.base_model.model, example_kwargs={"input_ids": ids}).num_blocks == plain == 4


@pytest.mark.parametrize("name", ["timm-vit_tiny", "timm-resnet18", "hf-gpt2"])
def test_real_model_stays_the_users_model(name):
    """On third-party models: class and submodule classes kept, a submodule hook fires, a
    batch-1 example then other batches, bf16/fp64 casts equal the cast original, pickle and
    deepcopy, frozen weights convert the same blocks, and (timm ViT) the default
    torch.compile off init equals eager."""
    pytest.importorskip("timm" if name.startswith("timm") else "transformers")
    from .real_models import REAL_MODELS

    factory, example, _ = REAL_MODELS[name]
    model = factory().eval()
    with torch.no_grad():  # timm zero-inits each block's last BatchNorm: its branches would add 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
    ref = copy.deepcopy(model)
    classes = {path: type(m) for path, m in model.named_modules()}
    args, kwargs = example(1)
    blocks = mhc_fx.find_residuals(copy.deepcopy(model).requires_grad_(False), args, kwargs).num_blocks
    assert mhc_fx.convert(model, args, kwargs, n=4) is model and type(model) is type(ref)
    assert mhc_fx.report(model).num_blocks == blocks > 0  # frozen weights are weights
    assert all(type(model.get_submodule(path)) is cls for path, cls in classes.items())
    leaf = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    seen = []
    hook = leaf.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))

    def first(out):
        return out.logits if hasattr(out, "logits") else out

    args, kwargs = example(3)
    with torch.no_grad():
        assert rel_err(first(model(*args, **kwargs)), first(ref(*args, **kwargs))) <= 1e-5
        assert 3 in seen
        hook.remove()  # a local lambda does not pickle
        # fp64: the init's constants are fp32 values (the H_pre weights σ(b) sum to 1 to fp32
        # rounding), so the original function holds to that rounding after .double(): 1.3e-10 on
        # GPT-2 and ViT (a LayerNorm at each branch input cancels the scale), 3e-8 on ResNet
        for cast, tol in ((torch.bfloat16, 2e-2), (torch.float64, 1e-7)):
            m, r = copy.deepcopy(model).to(cast), copy.deepcopy(ref).to(cast)
            a = [t.to(cast) if t.is_floating_point() else t for t in args]
            assert rel_err(first(m(*a, **kwargs)), first(r(*a, **kwargs))) <= tol, cast
    _off_init(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        out = first(model(*args, **kwargs))
        assert rel_err(out, first(ref(*args, **kwargs))) > 1e-3  # off init: another function
        for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
            assert type(other) is type(ref) and torch.equal(first(other(*args, **kwargs)), out)
        if name == "timm-vit_tiny":
            assert rel_err(torch.compile(model)(*args, **kwargs), out) <= 1e-5


def test_a_compiled_function_calling_a_converted_model_hands_it_its_backend():
    """``torch.compile(fn)`` where ``fn`` calls a converted model: the call is a graph break,
    and its rewritten capture goes to fn's backend (not run eagerly); the fusion reports of
    ``backend="mhc"`` are filed under the converted model."""
    model = Stack()
    x = torch.randn(2, 5, 16)
    mhc_fx.convert(model, (x,), sinkhorn_iters=3)
    _off_init(model)
    eager = model(x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    out = torch.compile(lambda t: model(t) * 2, backend=backend)(x)
    assert rel_err(out, 2 * eager) <= 1e-6
    assert mhc_fx.report(model).captures[-1].backend == "backend"
    sinkhorn = (torch.ops.aten._log_softmax.default, torch.ops.aten.log_softmax.int)  # the original has none
    assert any(node.target in sinkhorn for gm in graphs for node in gm.graph.nodes)  # the converted graph
    torch.compile(lambda t: model(t).sum(), backend="mhc")(x)
    assert mhc_fx.fusion_reports(model)[-1].num_pre == 3

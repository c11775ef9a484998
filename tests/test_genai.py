"""Export for generation: a converted decoder with its KV cache as an ONNX Runtime GenAI folder,
checked token for token against PyTorch's ``generate()`` — in GenAI and in a plain ONNX Runtime
session loop over past/present — with the connections off init so the tokens depend on them."""

import copy

import numpy as np
import pytest
import torch

import mhc_fx
from mhc_fx.export.genai import PAST_KEY, PAST_VALUE, genai_generate

from .real_models import REAL_MODELS

og = pytest.importorskip("onnxruntime_genai")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

NEW_TOKENS = 20
PROMPTS = [[5, 17, 99, 3, 42, 8], [77, 12, 60]]  # two lengths
EOS = 127  # the end token GenAI needs: generation stops there, and GenAI leaves it out


def _decoder(name):
    factory, _, _ = REAL_MODELS[name]
    model = factory().eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None  # 20 tokens, no early stop
    return model


def _generate(model, prompt, stop=True):
    """``model.generate``'s greedy new tokens, up to the end token with ``stop``."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(EOS)] if stop and EOS in tokens else tokens


def _tokenizer():
    """A byte-level BPE trained here (no downloads), as a transformers fast tokenizer."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = ["the cat sat on the mat", "hyper connections mix streams", "the stream of the model"] * 10
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["<eos>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(params=["hf-llama", "hf-gpt2"])
def exported(request, tmp_path):
    """(original, converted off init, the GenAI export report of the converted model)."""
    original = _decoder(request.param)
    model = copy.deepcopy(original)
    torch.manual_seed(0)
    mhc_fx.convert(model, example_kwargs={"input_ids": torch.randint(0, 128, (2, 8))})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_mhc." in name:
                p.add_(0.5 * torch.randn_like(p))
    report = mhc_fx.export_genai(model, tmp_path, _tokenizer(), check_tokens=NEW_TOKENS, eos_token_id=EOS)
    return original, model, report


def _session_greedy(path, ids, mask, new_tokens, layers, kv_heads, head_dim):
    """Greedy generation by hand over the decoder step's past/present: a prefill of the whole
    (left-padded) batch, then one token per step."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = ids.shape[0]
    past = {n % i: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for i in range(layers) for n in (PAST_KEY, PAST_VALUE)}
    tokens, mask = ids.numpy(), mask.numpy()
    step_ids, positions = tokens, np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = []
    for _ in range(new_tokens):
        logits, *present = session.run(None, {"input_ids": step_ids, "attention_mask": mask, "position_ids": positions, **past})
        nxt = logits[:, -1].argmax(-1)[:, None]
        out.append(nxt)
        past = dict(zip(past, present))
        step_ids, mask = nxt, np.concatenate([mask, np.ones((batch, 1), mask.dtype)], 1)
        positions = mask.sum(1, keepdims=True) - 1
    return np.concatenate(out, 1).tolist()


def test_genai_and_a_session_loop_generate_what_generate_does(exported):
    """GenAI's tokens are ``generate()``'s; a plain ONNX Runtime loop over past/present gives a
    left-padded batch's tokens, and batch 1's (one export per model: the checks share it)."""
    original, model, report = exported
    assert len(report.checked) == 2
    expected = [_generate(model, p) for p in PROMPTS]
    assert [genai_generate(report.folder, p, NEW_TOKENS) for p in PROMPTS] == expected
    # off init the connections change the tokens: the comparison sees them
    assert expected != [_generate(original, p) for p in PROMPTS]
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    got = _session_greedy(report.folder / "model.onnx", ids, mask, NEW_TOKENS, report.layers, report.kv_heads, report.head_dim)
    assert got == expected[:, width:].tolist()  # no end token here: both run all 20 steps
    # batch 1 through the same loop
    prompt = torch.tensor([PROMPTS[1]])
    single = _session_greedy(report.folder / "model.onnx", prompt, torch.ones_like(prompt), NEW_TOKENS, report.layers,
                             report.kv_heads, report.head_dim)
    assert single == [_generate(model, PROMPTS[1], stop=False)]


def test_an_unconverted_decoder_exports_the_same_way_and_genai_reads_its_tokenizer(tmp_path):
    model = _decoder("hf-llama")
    report = mhc_fx.export_genai(model, tmp_path, _tokenizer(), check_tokens=6, eos_token_id=EOS)
    assert (tmp_path / "genai_config.json").exists() and report.model_type == "llama" and len(report.checked) == 2
    text = "the cat mixes streams"
    tokenizer = og.Tokenizer(og.Model(str(tmp_path)))
    assert [int(t) for t in tokenizer.encode(text)] == _tokenizer().encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_models_it_cannot_export_raise(tmp_path):
    transformers = pytest.importorskip("transformers")
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64,
                                                             num_attention_heads=2, vocab_size=64, word_embed_proj_dim=32))
    with pytest.raises(mhc_fx.ExportError, match="'opt'.*export_onnx"):
        mhc_fx.export_genai(opt, tmp_path)
    with pytest.raises(mhc_fx.ExportError, match="Hugging Face causal LMs"):
        mhc_fx.export_genai(torch.nn.Linear(2, 2), tmp_path)
    llama = _decoder("hf-llama")
    with pytest.raises(mhc_fx.ExportError, match=r"float32.*model.float\(\)"):
        mhc_fx.export_genai(llama.to(torch.bfloat16), tmp_path)
    llama = llama.float()
    llama.config.eos_token_id = 1000
    with pytest.raises(mhc_fx.ExportError, match="end token 1000 .*eos_token_id="):
        mhc_fx.export_genai(llama, tmp_path)

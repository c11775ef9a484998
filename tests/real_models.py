"""Real third-party models with random weights from small configs (no downloads)."""

import torch


def _hf(cls_name, config_name, **config):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))


def _ids(batch, seq=12):
    return torch.randint(0, 128, (batch, seq))


SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128)

# name -> (factory, example (args, kwargs) for a batch size, identity residuals, converted-away adds)
REAL_MODELS = {
    "hf-gpt2": (
        lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                    bos_token_id=0, eos_token_id=0),
        lambda b: ((), {"input_ids": _ids(b), "use_cache": False}),
        4,
    ),
    "hf-llama": (
        lambda: _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, **SMALL),
        lambda b: ((), {"input_ids": _ids(b), "use_cache": False}),
        4,
    ),
    "hf-bert": (lambda: _hf("BertModel", "BertConfig", **SMALL), lambda b: ((), {"input_ids": _ids(b)}), 4),
    "hf-vit": (
        lambda: _hf("ViTModel", "ViTConfig", image_size=32, patch_size=8, **{k: v for k, v in SMALL.items() if k != "vocab_size"}),
        lambda b: ((torch.randn(b, 3, 32, 32),), {}),
        4,
    ),
    "timm-resnet18": (lambda: _timm("resnet18"), lambda b: ((torch.randn(b, 3, 64, 64),), {}), 5),
    "timm-vit_tiny": (lambda: _timm("vit_tiny_patch16_224", img_size=64, depth=2), lambda b: ((torch.randn(b, 3, 64, 64),), {}), 4),
    "timm-convnext_atto": (lambda: _timm("convnext_atto", depths=(1, 1, 2, 1)), lambda b: ((torch.randn(b, 3, 64, 64),), {}), 5),
    "torch-encoder-prenorm": (lambda: _encoder(True), lambda b: ((torch.randn(b, 10, 32),), {}), 4),
    "torch-encoder-postnorm": (lambda: _encoder(False), lambda b: ((torch.randn(b, 10, 32),), {}), 4),
}


def _timm(name, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _encoder(norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=norm_first)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

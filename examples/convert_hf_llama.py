"""Convert a Hugging Face Llama (random weights from a small config) to mHC and train it.

    python examples/convert_hf_llama.py [--steps 30]

Prints the conversion report, checks the converted model against the original, then trains
both on the same synthetic copy task and prints their losses.
"""

import argparse

import torch
import transformers

import mhc_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (4, 32))
    # the converted model accepts exactly the inputs it was captured with: labels included
    example = {"input_ids": ids, "labels": ids, "use_cache": False}
    converted = mhc_fx.convert(model, example_kwargs=example, n=args.n)
    print(mhc_fx.report(converted))

    with torch.no_grad():
        ref = model.eval()(**example).logits
        out = converted.eval()(**example).logits
    print(f"converted vs original: relative error {float((out - ref).norm() / ref.norm()):.2e}")

    # a copy task: the second half of each sequence repeats the first
    half = torch.randint(0, 64, (16, 16))
    data = torch.cat([half, half], dim=1)
    for name, net in (("original", model), ("mhc", converted)):
        net.train()
        opt = torch.optim.AdamW(mhc_fx.param_groups(net, 0.1), lr=3e-3)
        for _ in range(args.steps):
            loss = net(input_ids=data, labels=data, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{name:>8}: loss after {args.steps} steps {loss.item():.3f}")


if __name__ == "__main__":
    main()

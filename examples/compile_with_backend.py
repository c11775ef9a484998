"""Convert a GPT to mHC, compile it with the ``mhc`` backend (fused ops, selective
recomputation) and train it a few steps.

    python examples/compile_with_backend.py [--layers 4] [--steps 20]

The backend's reports (training and inference graph) say what it fused; after training the
compiled inference graph is checked against eager.
"""

import argparse
import logging

import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("mhc_fx.compile.backend").setLevel(logging.INFO)  # the fusion report, as it happens
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (4, 33))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model = mhc_fx.convert(TinyGPT(layers=args.layers, dim=32, heads=2), (inputs,), n=4)

    compiled = torch.compile(model, backend="mhc", fullgraph=True, options={"recompute": True})
    opt = torch.optim.AdamW(mhc_fx.param_groups(model, weight_decay=0.1), lr=3e-3)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(compiled(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():  # a second graph (inference), fused as well
        out, ref = compiled(inputs), model(inputs)
    for report in mhc_fx.fusion_reports(model):
        print(report)
    print(f"compiled vs eager after training: relative error {float((out - ref).norm() / ref.norm()):.2e}")


if __name__ == "__main__":
    main()

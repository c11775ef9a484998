"""Convert a timm model (random weights) to mHC and fine-tune it a few steps.

    python examples/convert_timm.py [--model resnet18] [--steps 20]

ResNet's projection-shortcut blocks are left alone (the report says why); the identity blocks
of each stage form one stream of shape [B, n, C, H, W].
"""

import argparse

import timm
import torch

import mhc_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
    images = torch.randn(8, 3, 64, 64)
    labels = torch.randint(0, 10, (8,))
    converted = mhc_fx.convert(model, (images[:2],), n=4)
    print(mhc_fx.report(converted))
    with torch.no_grad():
        ref, out = model(images), converted.eval()(images)
    print(f"converted vs original: relative error {float((out - ref).norm() / ref.norm()):.2e}")
    converted.train()  # BatchNorm in training mode, as in the original
    opt = torch.optim.SGD(mhc_fx.param_groups(converted, 1e-4), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(converted(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"loss after {args.steps} steps: {loss.item():.3f}")


if __name__ == "__main__":
    main()

"""Convert a GPT to mHC, export it to ONNX (with mhc_fx local functions) and run it in ONNX Runtime.

    python examples/export_onnx.py [--out gpt_mhc.onnx] [--steps 0]

``--steps`` trains the converted model first (so the file is not just the original function).
"""

import argparse
import pathlib
import tempfile

import onnxruntime as ort
import torch

import mhc_fx
from mhc_fx.demo.zoo import TinyGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(tempfile.gettempdir()) / "gpt_mhc.onnx"))
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 32))
    converted = mhc_fx.convert(TinyGPT(layers=2), (ids,))
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    for _ in range(args.steps):
        loss = converted(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = mhc_fx.export_onnx(converted, (ids,), args.out, functions=True)
    print(f"wrote {report.path}: {report.nodes} nodes, functions {report.functions}, inputs {report.inputs}")
    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    batch = torch.randint(0, 96, (3, 50))
    (logits,) = session.run(None, {"ids": batch.numpy()})
    with torch.no_grad():
        ref = converted.eval()(batch)
    err = float((torch.from_numpy(logits) - ref).norm() / ref.norm())
    print(f"ONNX Runtime vs PyTorch on a (3, 50) batch: relative error {err:.2e}")


if __name__ == "__main__":
    main()

"""ONNX Runtime (CPU) latency of original vs converted (mHC n=4) models, and node counts.

    python benchmarks/onnx_latency.py [--repeats 20] [--out-dir /tmp]

Models: a GPT-2 (Hugging Face, 4 layers, C=256, sequence 128) and timm's vit_tiny_patch16_224,
each at batch 1 and 8. Both files are exported by ``mhc_fx.export_onnx`` (verified).
"""

import argparse
import copy
import pathlib
import sys
import tempfile

import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

import mhc_fx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ort_timing import interleaved_medians, session  # noqa: E402


def _models():
    import timm
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=1024, n_positions=256)
    )
    yield "gpt2 (4 layers, C=256)", gpt2, lambda b: {"input_ids": torch.randint(0, 1024, (b, 128)), "use_cache": False}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    yield "vit_tiny_patch16_224", vit, lambda b: {"x": torch.randn(b, 3, 224, 224)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir or tempfile.mkdtemp())
    table = Table(title=f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, median of {args.repeats}, interleaved (ms)")
    for col in ("model", "batch", "original ms", "mHC n=4 ms", "×", "nodes original", "nodes mHC", "nodes / block"):
        table.add_column(col, justify="right")
    for name, model, make in _models():
        model.eval()
        kwargs = make(2)
        converted = mhc_fx.convert(copy.deepcopy(model), example_kwargs=kwargs, n=4)
        files = {}
        for tag, m in (("original", model), ("mhc", converted)):
            files[tag] = out / f"{name.split()[0]}_{tag}.onnx"
            mhc_fx.export_onnx(m, (), files[tag], example_kwargs=kwargs)
        nodes = {tag: len(onnx.load(str(p), load_external_data=False).graph.node) for tag, p in files.items()}
        per_block = (nodes["mhc"] - nodes["original"]) / mhc_fx.report(converted).num_blocks
        sessions = {tag: session(p, args.threads) for tag, p in files.items()}
        for batch in (1, 8):
            feeds = [v for v in make(batch).values() if isinstance(v, torch.Tensor)]
            runs = {}
            for tag, sess in sessions.items():
                runs[tag] = (sess, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), feeds)})
            medians = interleaved_medians(runs, args.repeats)
            base, mhc = medians["original"], medians["mhc"]
            table.add_row(name, str(batch), f"{base * 1e3:.2f}", f"{mhc * 1e3:.2f}", f"{mhc / base:.2f}",
                          str(nodes["original"]), str(nodes["mhc"]), f"{per_block:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()

"""Generation latency in ONNX Runtime (CPU): a Llama-shaped decoder, original vs converted (mHC
n=4), both exported by ``mhc_fx.export_genai`` (checked by generating in ONNX Runtime GenAI).

    python benchmarks/genai_latency.py [--layers 8] [--hidden 1024] [--past 128] [--prefill 128]

Times one decoder step of each file in a plain ONNX Runtime session (the runs of the two files
interleaved, medians): the prefill of ``--prefill`` tokens (past length 0) and the decode of one
new token after ``--past`` cached ones, batch 1. Prints a table with the ratio and the ONNX nodes
of each file.
"""

import argparse
import copy
import pathlib
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.export.genai import PAST_KEY, PAST_VALUE

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ort_timing import interleaved_medians, session  # noqa: E402


def _feeds(report, tokens: int, past: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, vocab, (1, tokens), dtype=np.int64),
        "attention_mask": np.ones((1, past + tokens), np.int64),
        "position_ids": np.arange(past, past + tokens, dtype=np.int64)[None],
    }
    shape = (1, report.kv_heads, past, report.head_dim)
    for i in range(report.layers):
        for name in (PAST_KEY, PAST_VALUE):
            feeds[name % i] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir or tempfile.mkdtemp())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256, vocab_size=args.vocab,
    )
    original = transformers.LlamaForCausalLM(config).eval()
    converted = mhc_fx.convert(copy.deepcopy(original), example_kwargs={"input_ids": torch.randint(0, args.vocab, (2, 16))}, n=4)
    reports = {}
    for tag, model in (("original", original), ("mhc", converted)):
        reports[tag] = mhc_fx.export_genai(model, out / tag, check_tokens=4)
    nodes = {tag: len(onnx.load(str(r.folder / "model.onnx"), load_external_data=False).graph.node) for tag, r in reports.items()}
    table = Table(title=f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, Llama-shaped (hidden {args.hidden}, "
                        f"{args.layers} layers, vocab {args.vocab}), batch 1, median of {args.repeats}, interleaved (ms)")
    for col in ("step", "original ms", "mHC n=4 ms", "×", "nodes original", "nodes mHC"):
        table.add_column(col, justify="right")
    sessions = {tag: session(r.folder / "model.onnx", args.threads) for tag, r in reports.items()}
    for step, tokens, past in ((f"prefill {args.prefill}", args.prefill, 0), (f"decode at past {args.past}", 1, args.past)):
        runs = {tag: (sessions[tag], _feeds(reports[tag], tokens, past, args.vocab)) for tag in reports}
        medians = interleaved_medians(runs, args.repeats)
        base, mhc = medians["original"], medians["mhc"]
        table.add_row(step, f"{base * 1e3:.2f}", f"{mhc * 1e3:.2f}", f"{mhc / base:.2f}", str(nodes["original"]), str(nodes["mhc"]))
    Console().print(table)


if __name__ == "__main__":
    main()

"""Training step of Hugging Face's DeepseekV4ForCausalLM (its own mHC, DeepSeek-V4's form)
compiled by plain Inductor against ``backend="mhc"``, which fuses its connections.

    python benchmarks/deepseek_v4_step.py [--layers 8] [--hidden 256] [--batch 4] [--seq 256]
        [--iters 20] [--device cpu|cuda] [--steps 5] [--rows inductor mhc mhc+recompute]

Per row: the first training step (Dynamo + fusion + AOTAutograd + Inductor compile + the step,
compile caches off), the median step (forward + backward + AdamW; the rows' steps timed in turn,
round by round, after all first steps), the bytes autograd saves for backward (each storage
once), and what the ``mhc`` backend fused. The model: vocab 512, head_dim 64, q/o LoRA rank
128, 8 routed experts top-2 (``--experts``: Hugging Face's experts implementation; ``eager``
loops over the experts in Python, which breaks the graph inside every layer), random weights
with the connections and the head moved off their init.
"""

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import mhc_fx
from mhc_fx.compile import backend as mhc_backend
from mhc_fx.memory import saved_bytes


def deepseek_v4(args) -> torch.nn.Module:
    import transformers

    config = transformers.DeepseekV4Config(
        vocab_size=512, hidden_size=args.hidden, moe_intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=128, o_lora_rank=128, o_groups=2,
        n_routed_experts=8, num_experts_per_tok=2, index_n_heads=4, index_head_dim=64, index_topk=64,
        sliding_window=128, hc_mult=4, hc_sinkhorn_iters=args.iters, max_position_embeddings=4 * args.seq,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(config)
    if args.experts:
        model.set_experts_implementation(args.experts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("fn", "hc_fn"):
                p.normal_(0.0, 0.02)
            elif leaf in ("base", "hc_base"):
                p.normal_(0.0, 0.5)
            elif leaf in ("scale", "hc_scale"):
                p.uniform_(0.5, 1.5)
    return model.to(args.device)


def compiled(model, row: str):
    if row == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend=mhc_backend.options(recompute=row.endswith("+recompute")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20, help="hc_sinkhorn_iters")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", default=None, help="Hugging Face experts implementation (default: its own)")
    parser.add_argument("--rows", nargs="+", default=["inductor", "mhc"], choices=["inductor", "mhc", "mhc+recompute"])
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    base = deepseek_v4(args)
    ids = torch.randint(0, 512, (args.batch, args.seq), device=args.device)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    runs = {}
    for row in args.rows:
        model = copy.deepcopy(base)
        run = compiled(model, row)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, run=run, opt=opt):
            opt.zero_grad(set_to_none=True)
            run(ids, labels=ids).loss.backward()
            opt.step()

        sync()
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
        saved = saved_bytes(lambda run=run: run(ids, labels=ids).loss)
        runs[row] = (model, step, first, saved, [])
    for _ in range(args.steps):
        for row, (_, step, _, _, times) in runs.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = Table(title=f"DeepseekV4ForCausalLM {args.layers} layers, hidden {args.hidden}, n=4, batch {args.batch} × "
                        f"{args.seq}, {args.iters} Sinkhorn iterations, {name}, torch {torch.__version__}")
    for column in ("compile", "first step s", "step ms", "first / step vs inductor", "saved MB", "saved vs inductor", "fused"):
        table.add_column(column)
    ref = runs.get("inductor")
    for row, (model, _, first, saved, times) in runs.items():
        median = statistics.median(times)
        reports = mhc_fx.fusion_reports(model) if row != "inductor" else []
        fused = "; ".join(f"pre {r.num_pre}, mixing {r.num_post_res}" for r in reports) or "-"
        table.add_row(
            row, f"{first:.1f}", f"{1e3 * median:.0f}", f"{first / ref[2]:.2f}× / {median / statistics.median(ref[4]):.2f}×" if ref else "-",
            f"{saved / 2**20:.1f}", f"{saved / ref[3]:.2f}×" if ref else "-", fused,
        )
    Console().print(table)


if __name__ == "__main__":
    main()

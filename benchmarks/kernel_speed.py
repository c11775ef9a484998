"""Speed of the fused mHC ops against the eager reference, torch.compile of the reference and
(when installed) Liger-Kernel's mHC ops.

    python benchmarks/kernel_speed.py                  # GPU: n=4, bf16, T ∈ {4096, 16384}, C ∈ {1280, 2560, 4096}
    python benchmarks/kernel_speed.py --interpret      # CPU, Triton interpreter, toy sizes (checks the script)

For each op (pre = coefficients + Sinkhorn + H_pre·X; post_res = H_res·X + H_postᵀ·y; the fused
post_res + pre of the next block) and pass (forward; forward + backward) it prints the median
time, the achieved bandwidth over the minimum bytes the op must move (each input read once,
each output written once), that bandwidth as a share of the measured device-to-device copy
bandwidth, and the speed-up over each other implementation. Liger-Kernel (``pip install
liger-kernel``) is compared where importable: ``liger_mhc_coeffs`` + ``liger_mhc_pre`` for pre,
``liger_mhc_post_res`` for post_res (its Sinkhorn adds an eps; the shapes and work are the same).
"""

import argparse
import os
import statistics
import sys
import time

if "--interpret" in sys.argv:  # Triton reads it when the kernels are first defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mhc_fx.kernels import cpu_path as reference, runtime  # noqa: E402
from mhc_fx.nn import functional as MF  # noqa: E402

ops = torch.ops.mhc_fx
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, a host clock on CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written)."""
    numel = (1 << 28) if device == "cuda" else (1 << 22)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench(lambda: dst.copy_(src), device, repeats)


def inputs(T: int, n: int, C: int, dtype: torch.dtype, device: str) -> dict:
    K = n * n + 2 * n

    def leaf(t):
        return t.to(device).requires_grad_()

    return dict(
        X=leaf(torch.randn(T, n, C).to(dtype)),
        y=leaf(torch.randn(T, C).to(dtype)),
        H_post=leaf(2 * torch.rand(T, n)),
        H_res=leaf(MF.sinkhorn(torch.randn(T, n, n), 20)),
        phi=leaf(0.02 * torch.randn(n * C, K)),
        alpha=leaf(torch.full((3,), 0.5)),
        bias=leaf(torch.randn(K)),
    )


def implementations(op: str, v: dict, iters: int, compile_reference: bool) -> dict:
    """Name → forward function returning the outputs that get gradients."""
    pre_args = (v["phi"], v["alpha"], v["bias"], iters, 1e-6)
    post_args = (v["X"], v["y"], v["H_post"], v["H_res"])
    # (fused op, reference, its inputs, the outputs a block uses downstream)
    fused, ref, args, used = {
        "pre": (ops.mhc_pre, reference.mhc_pre, (v["X"], *pre_args), lambda o: (o[0], o[2], o[3])),
        "post_res": (ops.post_res, reference.post_res, post_args, lambda o: (o,)),
        "post_res+pre": (
            ops.post_res_pre, reference.post_res_pre, (*post_args, *pre_args), lambda o: (o[0], o[1], o[3], o[4])
        ),
    }[op]
    fns = {"mhc_fx": lambda: used(fused(*args)), "eager": lambda: used(ref(*args))}
    if compile_reference:
        compiled = torch.compile(ref, dynamic=False)
        fns["compile"] = lambda: used(compiled(*args))
    liger = liger_functions(op, v, iters)
    if liger:
        fns["liger"] = liger
    return fns


def liger_functions(op: str, v: dict, iters: int):
    try:
        from liger_kernel.transformers import functional as LF
    except ImportError:
        return None
    if op == "post_res":
        return lambda: (LF.liger_mhc_post_res(v["X"], v["y"], v["H_post"], v["H_res"]),)
    if op == "pre":
        a = v["alpha"]

        def pre():
            h_pre, h_post, h_res = LF.liger_mhc_coeffs(
                v["X"], v["phi"], v["bias"], a[0], a[1], a[2], allow_fp32=True, tmax=iters
            )
            return LF.liger_mhc_pre(v["X"], h_pre), h_post, h_res

        return pre
    return None  # Liger has no cross-layer fusion


def with_backward(forward):
    """Forward, then backward with fixed random cotangents."""
    cotangents = [torch.randn_like(o) for o in forward()]

    def run():
        torch.autograd.backward(forward(), cotangents)

    return run


def min_bytes(op: str, T: int, n: int, C: int, s: int, backward: bool) -> int:
    """Fewest bytes of HBM traffic: stream tensors (s bytes/value) once each, fp32 coefficients."""
    coef = 4 * (2 * n + n * n)
    phi = 4 * n * C * (n * n + 2 * n)
    fwd = {
        "pre": T * (n * C * s + C * s + coef) + phi,
        "post_res": T * (n * C * s + C * s + coef + n * C * s),
        "post_res+pre": T * (n * C * s + C * s + coef + n * C * s + C * s + coef) + phi,
    }[op]
    bwd = {
        "pre": T * (n * C * s + C * s + coef + n * C * s) + 2 * phi,  # X, dh, dH in; dX out; φ, dφ
        "post_res": T * (n * C * s + C * s + coef + n * C * s + n * C * s + C * s + coef),
        "post_res+pre": T * (2 * n * C * s + 2 * C * s + 2 * coef + 3 * n * C * s + C * s + coef) + 2 * phi,
    }[op]
    return fwd + (bwd if backward else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--channels", type=int, nargs="+")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (CUDA uses do_bench)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--interpret", action="store_true", help="CPU + Triton interpreter at toy sizes")
    args = parser.parse_args()
    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA GPU; use --interpret to check it on CPU at toy sizes")
    tokens = args.tokens or ([40] if args.interpret else [4096, 16384])
    channels = args.channels or ([96] if args.interpret else [1280, 2560, 4096])
    dtype = DTYPES[args.dtype or ("fp16" if args.interpret else "bf16")]  # the interpreter mishandles bf16
    console = Console(width=140)
    bandwidth = copy_bandwidth(device, args.repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    console.print(f"{name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; n={args.n}, {dtype}, t_max={args.iters}")
    table = Table(title="fused mHC ops: median time, bandwidth, speed-up")
    for col in ("T", "C", "op", "pass", "mhc_fx ms", "GB/s", "% copy", "× eager", "× compile", "× liger"):
        table.add_column(col, justify="right")
    for T in tokens:
        for C in channels:
            v = inputs(T, args.n, C, dtype, device)
            for op in ("pre", "post_res", "post_res+pre"):
                fns = implementations(op, v, args.iters, not args.no_compile)
                for backward in (False, True):
                    times = {}
                    for impl, fn in fns.items():
                        run = with_backward(fn) if backward else (lambda f=fn: f())
                        if not backward:
                            run = torch.no_grad()(run)
                        times[impl] = bench(run, device, args.repeats)
                    ours = times["mhc_fx"]
                    gbps = min_bytes(op, T, args.n, C, v["X"].element_size(), backward) / ours
                    ratio = {k: f"{times[k] / ours:.2f}" if k in times else "–" for k in ("eager", "compile", "liger")}
                    table.add_row(
                        str(T), str(C), op, "fwd+bwd" if backward else "fwd", f"{ours * 1e3:.3f}",
                        f"{gbps / 1e9:.0f}", f"{100 * gbps / bandwidth:.0f}", ratio["eager"], ratio["compile"], ratio["liger"],
                    )
            del v
    console.print(table)
    console.print("kernel launches:", dict(runtime.launches))


if __name__ == "__main__":
    main()

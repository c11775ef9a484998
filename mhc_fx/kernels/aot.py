"""Ahead-of-time compilation of the kernels for a GPU target, on any machine (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` lowers a kernel to PTX and
runs ``ptxas`` (shipped with Triton) to a cubin; the compiled kernel's metadata gives its shared
memory and ``ptxas -v`` its registers and spills. Each kernel is compiled with exactly the
:func:`~mhc_fx.kernels.runtime.launch_config` its launcher would pick on that target, so
``tests/test_kernels_compile.py`` and ``benchmarks/kernel_resources.py`` check what runs.

Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted, and the CPU
test suite sets ``TRITON_INTERPRET=1``: :func:`measure_all` therefore compiles in worker
processes started without it (one per core, in parallel).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile

import torch

from ..nn.functional import Form
from . import runtime

#: Kernel name → (module, ``@triton.jit`` function).
_SOURCES = {
    "pre_fwd": ("pre", "_pre_fwd"),
    "post_res_pre_fwd": ("pre", "_post_res_pre_fwd"),
    "pre_bwd": ("pre", "_pre_bwd"),
    "pre_bwd_phi": ("pre", "_pre_bwd_phi"),
    "post_res_fwd": ("post_res", "_post_res_fwd"),
    "post_res_bwd": ("post_res", "_post_res_bwd"),
}
#: Kernel arguments in the stream dtype; other pointers are in the compute dtype (float32).
_STREAM_ARGS = frozenset({"X", "Y", "H", "OUT", "XN", "DX", "DY", "DH", "G"})
_INT_ARGS = frozenset({"T", "C", "iters", "NC", "tokens_per_split"})
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Registers and threads per SM, and resident blocks per SM, by compute capability.
_SM_LIMITS = {80: (65536, 2048, 32), 86: (65536, 1536, 16), 89: (65536, 1536, 24), 90: (65536, 2048, 32)}
#: Shared memory per SM: the per-block opt-in limit plus the 1 KiB the driver reserves per block.
_RESERVED_SMEM = 1024


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile: a kernel (a key of :data:`runtime.KERNELS`) at n streams, C channels, a
    stream dtype, for a target (a key of :data:`runtime.TARGETS`), in a form of mHC (its
    :attr:`~mhc_fx.nn.functional.Form.spec`; the pre-side kernels compile per form)."""

    kernel: str
    target: str
    n: int
    C: int
    dtype: torch.dtype
    form: str = "paper"

    def launch(self) -> runtime.Launch:
        """What the launcher picks for this spec."""
        return runtime.launch_config(
            self.kernel, self.n, self.C, self.dtype, runtime.TARGETS[self.target], Form.from_spec(self.form)
        )


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the compiler says about one :class:`Spec`: registers per thread, spill bytes
    (stores), stack frame bytes, shared memory bytes (dynamic, as launched), and the blocks
    one SM holds by shared memory and by registers."""

    spec: Spec
    launch: runtime.Launch
    registers: int
    spills: int
    stack: int
    shared: int
    ctas_by_smem: int
    ctas_by_regs: int

    @property
    def fits(self) -> bool:
        """Whether the kernel can launch on its target (shared memory within the opt-in limit)."""
        return self.shared <= runtime.TARGETS[self.spec.target].shared_memory


def _kernel(name: str):
    module = importlib.import_module(f"{__package__}.{_SOURCES[name][0]}")
    fn = getattr(module, _SOURCES[name][1])
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("mhc_fx.kernels.aot: the kernels were imported with TRITON_INTERPRET=1; compile in a "
                           "process without it (measure_all does)")
    return fn


def _signature(fn, launch: runtime.Launch, dtype: torch.dtype) -> dict[str, str]:
    """Argument types as the launcher passes them."""
    stream = "*" + _TRITON_TYPES[dtype]
    types = {}
    for name in fn.arg_names:
        if name in launch.constexprs:
            types[name] = "constexpr"
        elif name in _INT_ARGS:
            types[name] = "i32"
        elif name in ("eps", "pre_eps", "res_eps"):
            types[name] = "fp32"
        else:
            types[name] = stream if name in _STREAM_ARGS else "*fp32"
    return types


def compile_spec(spec: Spec):
    """The ``triton.compile`` result (``.asm`` with ttir/ptx/cubin, ``.metadata``) of ``spec``."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _kernel(spec.kernel)
    launch = spec.launch()
    types = _signature(fn, launch, spec.dtype)
    # the divisibility Triton's JIT specialises on: 16-byte aligned pointers, integers % 16 == 0
    multiples = {"C": spec.C, "NC": spec.n * spec.C, "tokens_per_split": runtime.BLOCK_T}
    aligned = [name for name, ty in types.items() if ty.startswith("*") or multiples.get(name, 1) % 16 == 0]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=types, constexprs=launch.constexprs, attrs=attrs)
    options = {k: v for k, v in (("num_warps", launch.num_warps), ("num_stages", launch.num_stages)) if v}
    return triton.compile(src, target=GPUTarget("cuda", runtime.TARGETS[spec.target].capability, 32), options=options)


@functools.cache
def _bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else shutil.which(tool) or ""


def toolchain_available() -> bool:
    """Whether Triton's NVIDIA backend and its ``ptxas`` are installed (no GPU needed)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return bool(_bin("ptxas"))


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, stack frame bytes)`` from ``ptxas -v`` on ``ptx``."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_bin("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return registers, spills, stack


def _ctas_per_sm(capability: int, shared: int, registers: int, warps: int, smem_limit: int) -> tuple[int, int]:
    """Resident blocks per SM allowed by shared memory and by registers (and threads)."""
    regs_per_sm, threads_per_sm, blocks_per_sm = _SM_LIMITS[capability]
    by_smem = (smem_limit + _RESERVED_SMEM) // (shared + _RESERVED_SMEM) if shared <= smem_limit else 0
    per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 per warp
    by_regs = min(regs_per_sm // (per_warp * warps), threads_per_sm // (32 * warps))
    return min(by_smem, blocks_per_sm), min(by_regs, blocks_per_sm)


def measure(spec: Spec) -> Resources:
    """Compile ``spec`` and read its resources (needs a process without ``TRITON_INTERPRET``)."""
    compiled = compile_spec(spec)
    target = runtime.TARGETS[spec.target]
    registers, spills, stack = _ptxas_usage(compiled.asm["ptx"], target.capability)
    shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
    by_smem, by_regs = _ctas_per_sm(target.capability, shared, registers, warps, target.shared_memory)
    launch = dataclasses.replace(spec.launch(), num_warps=warps, num_stages=compiled.metadata.num_stages)
    return Resources(spec, launch, registers, spills, stack, shared, by_smem, by_regs)


def ttir(spec: Spec) -> str:
    """The Triton IR of ``spec`` after Triton's front-end passes."""
    return compile_spec(spec).asm["ttir"]


def _compiling_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def run_compiled(fn, items: list, workers: int | None = None) -> list:
    """``[fn(item) for item in items]`` in worker processes where the kernels compile (spawned
    without ``TRITON_INTERPRET``), one per core."""
    context = multiprocessing.get_context("spawn")
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # spawned children copy the environment now
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers or os.cpu_count() or 1, mp_context=context, initializer=_compiling_worker
        ) as pool:
            return list(pool.map(fn, items))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _compile_key(spec: Spec) -> tuple:
    """Specs with equal keys compile to the same binary (C enters only through the launch and
    its divisibility by 16)."""
    return spec.kernel, spec.target, spec.dtype, spec.launch(), spec.C % 16 == 0


def measure_all(specs: list[Spec], workers: int | None = None) -> dict[Spec, Resources]:
    """:func:`measure` of every spec, compiling each distinct binary once."""
    first = {}
    for spec in specs:
        first.setdefault(_compile_key(spec), spec)
    measured = dict(zip(first, run_compiled(measure, list(first.values()), workers)))
    return {spec: dataclasses.replace(measured[_compile_key(spec)], spec=spec) for spec in specs}

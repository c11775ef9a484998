"""Where the Triton kernels run, how many times they were launched, and their tile sizes.

Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted
(``TRITON_INTERPRET=1``), so the kernel modules are imported lazily, on the first launch, and
:func:`use_triton` answers per tensor: CUDA tensors always run the kernels; CPU tensors run them
only under the interpreter (otherwise the ops run the pure-torch reference of
:mod:`mhc_fx.kernels.cpu_path`, which computes the same function: eagerly, or compiled by
Inductor once per shape). Each op call names its path (:data:`PATHS`): the ``mhc`` backend pins
it per compile, and a forward hands the path it ran to its backward.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import dataclasses
import functools
import os
import warnings
from typing import Callable, Iterator, NamedTuple

import torch

from ..nn.functional import PAPER, Form

#: Kernel name → number of launches in this process (tests and benchmarks read it).
launches: collections.Counter[str] = collections.Counter()

#: Tokens per program of every kernel (``tl.dot`` needs at least 16 rows).
BLOCK_T = 16
#: Columns of the pre/post coefficient tiles: ≥ n for n ≤ 8 and ≥ 16 for ``tl.dot``.
COEF_WIDTH = 16


_poison: float | None = None


@contextlib.contextmanager
def poisoned_outputs(value: float = float("nan")) -> Iterator[None]:
    """Fill every kernel output with ``value`` before its launch (tests: unwritten elements
    then show up as NaN instead of passing by luck)."""
    global _poison
    previous, _poison = _poison, value
    try:
        yield
    finally:
        _poison = previous


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel: uninitialised, or poisoned inside :func:`poisoned_outputs`."""
    if _poison is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, _poison, dtype=dtype, device=device)


def parallel_programs(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM on CUDA, one on the CPU interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (then CPU tensors run the kernels interpreted)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor | torch.device) -> bool:
    """Whether the kernels run for tensors on ``t``'s device (CUDA, or CPU when interpreting).

    Raises:
        RuntimeError: for CUDA when Triton is not installed.
    """
    device = t if isinstance(t, torch.device) else t.device
    if device.type == "cuda":
        if not triton_available():
            raise RuntimeError("mhc_fx's CUDA kernels need Triton: pip install triton (or mhc_fx[gpu])")
        return True
    return device.type == "cpu" and interpreting() and triton_available()


#: Where an op call runs: ``triton`` (the kernels: compiled on CUDA, interpreted on CPU),
#: ``reference`` (the pure-torch CPU path, eagerly) or ``compiled_reference`` (the CPU path
#: compiled by Inductor (:func:`reference`): eagerly, the small ops of every Sinkhorn
#: iteration on ``[T, n, n]`` cost more than the stream traffic). ``auto`` picks ``triton``
#: where :func:`use_triton` says so, else ``reference``.
PATHS = ("auto", "triton", "reference", "compiled_reference")


def resolve_path(path: str, t: torch.Tensor) -> str:
    """The concrete path of an op call on tensors like ``t``; a backward runs the path its
    forward resolved (the op passes it on), so both halves of a step compute alike.

    Raises:
        ValueError: for an unknown path, or ``triton`` on CPU without the interpreter.
    """
    if path not in PATHS:
        raise ValueError(f"mhc_fx ops: path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "triton" if use_triton(t) else "reference"
    if path == "triton" and not use_triton(t):
        raise ValueError(
            f"mhc_fx ops: path 'triton' for {t.device.type} tensors needs CUDA, or TRITON_INTERPRET=1 on CPU "
            "(set before the first launch); use path='reference' to run the pure-torch CPU path"
        )
    if path != "triton" and t.device.type != "cpu":
        raise ValueError(f"mhc_fx ops: path {path!r} runs on CPU tensors only, got {t.device.type}")
    return path


def pinned_path(device: torch.device, cpu: str) -> str:
    """The path a compile pins for its ops on ``device``: ``triton`` where the kernels run
    (CUDA; CPU while interpreting), else ``cpu`` (``reference`` or ``compiled_reference``)."""
    return "triton" if use_triton(device) else cpu


_compiled: dict[Callable, "CompiledReference"] = {}


def reference(fn: Callable, path: str) -> Callable:
    """``fn`` (a function of :mod:`mhc_fx.kernels.cpu_path`) as ``path`` runs it: as is, or
    compiled by Inductor (:class:`CompiledReference`, one per function, shared by every block)."""
    if path != "compiled_reference":
        return fn
    if fn not in _compiled:
        _compiled[fn] = CompiledReference(fn)
    return _compiled[fn]


class CompiledReference:
    """``fn`` compiled by Inductor (``fullgraph``, static shapes: one compile per shape; symbolic
    sizes trip the Sinkhorn ``scan``). A call that would pass Dynamo's recompile limit
    (``torch._dynamo.config.recompile_limit`` variants of the inputs) runs ``fn`` eagerly
    instead — the same function, slower — and says so once in a warning."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.compiled, self.warned = fn, torch.compile(fn, fullgraph=True, dynamic=False), False

    def __call__(self, *args):
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"mhc_fx: the compiled CPU path of {self.fn.__name__} reached Dynamo's recompile limit "
                    f"({torch._dynamo.config.recompile_limit} input variants); calls with new shapes run it eagerly "
                    "(same results, slower). Raise torch._dynamo.config.recompile_limit to compile them.",
                    stacklevel=2,
                )
            return self.fn(*args)


def count(name: str) -> None:
    """Record one launch of kernel ``name``."""
    launches[name] += 1


def pow2(x: int) -> int:
    """Smallest power of two ≥ ``x``."""
    return 1 << max(0, (x - 1).bit_length())


def stream_tile(n: int) -> int:
    """Padded stream count ``NP``: the power of two ≥ n."""
    return pow2(n)


def res_tile(n: int) -> int:
    """Side ``RP`` of the padded n×n Sinkhorn tile: ≥ n, and RP² ≥ 16 for ``tl.dot``."""
    return max(pow2(n), 4)


def channel_block(n: int, channels: int, budget: int = 256, floor: int = 1) -> int:
    """Channels per step ``BC``: ~``budget / NP`` (a ``[BLOCK_T, NP, BC]`` tile of ~``budget``·16
    values) but at least ``floor``, at most the channels rounded up to a power of two; and
    ``NP·BC ≥ 16`` for ``tl.dot``."""
    return max(16 // stream_tile(n), min(pow2(channels), max(floor, budget // stream_tile(n))))


def compute_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for fp32/fp64 streams; TF32 for fp16/bf16 streams
    (their values are exact in TF32; φ is rounded to 10 mantissa bits, under their tolerance)."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


# ---------------------------------------------------------------------------------------------
# Launch configurations: the one place that picks every kernel's tiles, warps and stages, for
# the launchers and for the ahead-of-time compile test (tests/test_kernels_compile.py), which
# compiles exactly these for sm_80 / sm_86 / sm_90 on CPU.
# ---------------------------------------------------------------------------------------------
class Target(NamedTuple):
    """A CUDA device as the launch configuration sees it: compute capability (``90`` for 9.0)
    and shared memory per block with opt-in, in bytes."""

    capability: int
    shared_memory: int


#: Targets the compile test and ``benchmarks/kernel_resources.py`` check (H100, A100, RTX 30/40).
TARGETS = {
    "sm_90": Target(90, 227 * 1024),
    "sm_80": Target(80, 163 * 1024),
    "sm_86": Target(86, 99 * 1024),
}

#: Kernel names of :func:`launch_config` (the ``@triton.jit`` functions without the underscore).
KERNELS = ("pre_fwd", "post_res_pre_fwd", "pre_bwd", "pre_bwd_phi", "post_res_fwd", "post_res_bwd")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Compile-time arguments of one kernel launch: its ``tl.constexpr`` tiles, and the warps
    and software-pipelining stages (``None``: Triton's default, as under the interpreter)."""

    tiles: tuple[tuple[str, object], ...]
    num_warps: int | None = None
    num_stages: int | None = None

    @property
    def constexprs(self) -> dict[str, object]:
        """The ``tl.constexpr`` arguments by name."""
        return dict(self.tiles)

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``kernel[grid](...)``."""
        extra = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {**self.constexprs, **{k: v for k, v in extra.items() if v is not None}}


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(10 * props.major + props.minor, props.shared_memory_per_block_optin)


def device_target(device: torch.device) -> Target | None:
    """The :class:`Target` of a CUDA device; ``None`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def form_constants(form: Form) -> dict[str, object]:
    """The ``tl.constexpr`` arguments that say which Sinkhorn ``form`` computes (its epsilons are
    runtime arguments): ``DIVISION`` (the division iteration of a form with epsilons or another
    order, else the paper's log domain), ``SOFTMAX_START``, ``COLUMN_PARITY`` (division steps
    ``k`` with ``k % 2 == COLUMN_PARITY`` normalise columns) and ``TRANSPOSED``."""
    division = form.softmax_start or bool(form.res_eps) or not form.columns_first
    first_columns = form.softmax_start or form.columns_first  # the softmax was the first rows step
    return {"DIVISION": division, "SOFTMAX_START": form.softmax_start, "COLUMN_PARITY": 0 if first_columns else 1,
            "TRANSPOSED": form.transposed}


def _pre_tiles(n: int, bc: int, dtype: torch.dtype, form: Form) -> dict[str, object]:
    return {"N": n, "NP": stream_tile(n), "W": COEF_WIDTH, "RP": res_tile(n), "K": n * n + 2 * n, "BT": BLOCK_T,
            "BC": bc, "PREC": compute_precision(dtype), **form_constants(form)}


def _tiles(kernel: str, n: int, channels: int, dtype: torch.dtype, budget: int, floor: int, form: Form) -> dict[str, object]:
    """The ``tl.constexpr`` arguments of ``kernel`` (channel steps: :func:`channel_block`)."""
    bc = channel_block(n, channels, budget, floor)
    if kernel in ("pre_fwd", "post_res_pre_fwd", "pre_bwd"):
        return _pre_tiles(n, bc, dtype, form)
    if kernel == "pre_bwd_phi":
        K = n * n + 2 * n
        return {"K": K, "KP": max(16, pow2(K)), "BK": 64, "BT": BLOCK_T, "PREC": compute_precision(dtype)}
    if kernel in ("post_res_fwd", "post_res_bwd"):
        return {"N": n, "NP": stream_tile(n), "BT": BLOCK_T, "BC": bc}
    raise ValueError(f"mhc_fx kernels: unknown kernel {kernel!r}, expected one of {KERNELS}")


#: On a GPU, kernel → (channel budget, num_warps, num_warps for float32 streams, num_stages),
#: chosen from the compiled resources (benchmarks/kernel_resources.py, docs/kernels.md). The
#: pre-side kernels step over 64 rows of φ (128 at n = 8) with 2 stages: Triton's cp.async
#: double buffer of the three φ tiles and the X tile then takes 18–69 KiB of shared memory
#: (3 stages of 256 rows took 128–252 KiB: one program per SM, over the limit at n = 8), and
#: registers stay ≤ 168 without spills for n ≤ 4 (1 stage keeps the loads in registers and
#: spills). float32 streams hold twice the bytes per tile: 8 warps where 4 spilled a few bytes.
_GPU_TUNING = {
    "pre_fwd": (64, 4, 4, 2),
    "post_res_pre_fwd": (64, 4, 8, 2),
    "pre_bwd": (64, 4, 8, 2),
    "pre_bwd_phi": (256, 4, 4, 3),  # no channel steps: 64 rows of φ × 16 tokens per step
    "post_res_fwd": (128, 4, 4, 3),
    "post_res_bwd": (64, 4, 8, 3),
}
#: On a GPU, at least 16 channels per step: a 32-byte sector of a bf16 row of X per (token, stream).
_GPU_MIN_CHANNELS = 16


def launch_config(
    kernel: str, n: int, channels: int, dtype: torch.dtype, target: Target | None, form: Form = PAPER
) -> Launch:
    """Tiles, warps and stages of ``kernel`` (a name of :data:`KERNELS`) for ``X [T, n, C]`` of
    ``dtype`` on ``target`` (``None``: the interpreter, which ignores warps and stages), for the
    pre-side kernels in ``form`` (:func:`form_constants`).

    Every target gets the same configuration (it fits 99 KiB of shared memory); ``target`` is
    the hook for one that needs its own."""
    if target is None:
        return Launch(tuple(_tiles(kernel, n, channels, dtype, 256, 1, form).items()))
    budget, warps, fp32_warps, stages = _GPU_TUNING[kernel]
    warps = fp32_warps if dtype == torch.float32 else warps
    return Launch(tuple(_tiles(kernel, n, channels, dtype, budget, _GPU_MIN_CHANNELS, form).items()), warps, stages)


def launch_for(kernel: str, X: torch.Tensor, form: Form = PAPER) -> Launch:
    """:func:`launch_config` of ``kernel`` for the stream ``X [T, n, C]`` on its device."""
    _, n, C = X.shape
    return launch_config(kernel, n, C, X.dtype, device_target(X.device), form)

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
import os
from typing import Callable, Iterator

import torch

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
#: compiled by Inductor once per op and shape: eagerly, the small ops of every Sinkhorn
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


_compiled: dict[Callable, Callable] = {}


def reference(fn: Callable, path: str) -> Callable:
    """``fn`` (a function of :mod:`mhc_fx.kernels.cpu_path`) as ``path`` runs it: as is, or
    compiled by Inductor (``fullgraph``, static shapes: one compile per function and shape,
    shared by every block)."""
    if path != "compiled_reference":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled[fn]


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


def channel_block(n: int, channels: int, budget: int = 256) -> int:
    """Channels per step ``BC`` so that a ``[BLOCK_T, NP, BC]`` tile holds ~``budget``·16 values;
    ``NP·BC ≥ 16`` for ``tl.dot``."""
    return max(16 // stream_tile(n), min(pow2(channels), budget // stream_tile(n)))


def compute_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for fp32/fp64 streams; TF32 for fp16/bf16 streams
    (their values are exact in TF32; φ is rounded to 10 mantissa bits, under their tolerance)."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"

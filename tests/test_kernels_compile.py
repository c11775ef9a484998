"""The Triton kernels compiled for GPU targets on CPU (no GPU needed), with exactly the launch
configuration their launchers pick (``runtime.launch_config``): they compile for sm_80, sm_86
and sm_90, fit the target's shared memory, do not spill for n ≤ 4, leave room for two pre-side
programs per SM at n ≤ 4, and index the streams with 64-bit offsets.

Compiling needs Triton's NVIDIA backend (its bundled ``ptxas``); the compiles run in worker
processes without ``TRITON_INTERPRET`` (see :mod:`mhc_fx.kernels.aot`), each distinct binary
once per session (Triton's on-disk cache makes later sessions faster still).
"""

import os
import pickle
import re

import filelock
import pytest
import torch

from mhc_fx.kernels import aot, runtime

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mhc_fx.kernels.tiles import _program_tokens, _stream_offsets  # noqa: E402  (interpreted on CPU)

needs_toolchain = pytest.mark.skipif(
    not aot.toolchain_available(), reason="Triton's NVIDIA backend (ptxas) is not installed"
)

STREAMS = (1, 2, 4, 8)
PRE_SIDE = ("pre_fwd", "post_res_pre_fwd", "pre_bwd")
CHANNELS = (1280, 4096)
DTYPES = (torch.float32, torch.bfloat16)
#: The pre-side kernels compile per form of mHC (its Sinkhorn is constexpr): DeepSeek-V4's on
#: the targets it is trained and served on.
SPECS = [
    aot.Spec(kernel, target, n, C, dtype)
    for kernel in runtime.KERNELS for target in runtime.TARGETS for n in STREAMS for C in CHANNELS for dtype in DTYPES
] + [
    aot.Spec(kernel, target, n, C, dtype, "deepseek_v4")
    for kernel in PRE_SIDE for target in ("sm_80", "sm_90") for n in STREAMS for C in CHANNELS for dtype in DTYPES
]


@pytest.fixture(scope="session")
def resources(tmp_path_factory) -> dict:
    """``aot.measure_all(SPECS)``, computed by one pytest-xdist worker and read by the others."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return aot.measure_all(SPECS)
    path = tmp_path_factory.getbasetemp().parent / "kernel_resources.pickle"
    with filelock.FileLock(f"{path}.lock"):
        if not path.exists():
            path.write_bytes(pickle.dumps(aot.measure_all(SPECS)))
        return pickle.loads(path.read_bytes())


def _rows(resources, kernel, target, n_max=8) -> list:
    return [r for s, r in resources.items() if s.kernel == kernel and s.target == target and s.n <= n_max]


def _describe(r) -> str:
    s = r.spec
    return (f"n={s.n} C={s.C} {s.dtype} form={s.form} {r.launch}: {r.registers} registers, {r.spills} B spilled, "
            f"{r.shared} B shared, {r.ctas_by_smem}/{r.ctas_by_regs} CTAs per SM (smem/registers)")


@needs_toolchain
@pytest.mark.parametrize("target", list(runtime.TARGETS))
@pytest.mark.parametrize("kernel", runtime.KERNELS)
def test_compiles_within_shared_memory(resources, kernel, target):
    too_big = [_describe(r) for r in _rows(resources, kernel, target) if not r.fits]
    assert not too_big, f"{kernel} on {target} needs more than {runtime.TARGETS[target].shared_memory} B:\n" + "\n".join(too_big)


@needs_toolchain
@pytest.mark.parametrize("target", list(runtime.TARGETS))
@pytest.mark.parametrize("kernel", runtime.KERNELS)
def test_no_register_spills_up_to_four_streams(resources, kernel, target):
    # DeepSeek-V4's division Sinkhorn in post_res_pre_fwd on sm_90 spills 4–8 bytes at n ≤ 2
    # (ptxas, 2026-12-07; docs/kernels.md): allowed that much, and no more, for that form
    allowed = {"paper": 0, "deepseek_v4": 8}
    spilling = [_describe(r) for r in _rows(resources, kernel, target, n_max=4) if r.spills > allowed[r.spec.form]]
    assert not spilling, f"{kernel} on {target} spills:\n" + "\n".join(spilling)


@needs_toolchain
@pytest.mark.parametrize("target", list(runtime.TARGETS))
@pytest.mark.parametrize("kernel", PRE_SIDE)
def test_two_pre_programs_per_sm_up_to_four_streams(resources, kernel, target):
    crowded = [_describe(r) for r in _rows(resources, kernel, target, n_max=4) if min(r.ctas_by_smem, r.ctas_by_regs) < 2]
    assert not crowded, f"{kernel} on {target} holds fewer than 2 programs per SM:\n" + "\n".join(crowded)


def test_interpreter_keeps_default_warps_and_stages():
    for kernel in runtime.KERNELS:
        launch = runtime.launch_config(kernel, 4, 4096, torch.float32, None)
        assert launch.num_warps is None and launch.num_stages is None
        assert "num_warps" not in launch.kwargs()


# ---------------------------------------------------------------------------------------------
# 64-bit indexing. Compiled: the stream pointers of _post_res_fwd / _pre_fwd advance per token
# by i64 offset tensors in the TTIR for sm_90. Interpreted: the kernels' own token and offset helpers
# run for the last program of a stream with T·n·C ≈ 4·2³¹ (nothing that size is allocated) and
# match Python integers; an int32 product would wrap (the interpreter computes in numpy with
# the IR's types).
# ---------------------------------------------------------------------------------------------
@needs_toolchain
def test_compiled_stream_offsets_are_int64():
    kernels = ("post_res_fwd", "pre_fwd")
    irs = aot.run_compiled(aot.ttir, [aot.Spec(kernel, "sm_90", 4, 4096, torch.bfloat16) for kernel in kernels])
    for kernel, ir in zip(kernels, irs):
        pid = re.search(r"(%\S+) = tt\.get_program_id x : i32", ir).group(1)
        assert re.search(rf"arith\.extsi {pid} : i32 to i64", ir), f"{kernel}: the program id is not widened to i64"
        # Triton splits ``ptr + (t·n·C + i·C + c)`` into a per-token i64 step and the in-token rest
        # (< n·C, exact in i32)
        steps = re.findall(r"tt\.addptr .*: tensor<16x[0-9x]*!tt\.ptr<bf16>>, tensor<16x[0-9x]*i64>", ir)
        assert steps, f"{kernel}: no i64 step of a stream pointer"


@triton.jit
def _offsets(OFFS, MASK, pid, T, C, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Store ``_stream_offsets [BT, NP, BC]`` and the token mask of program ``pid`` (an argument)."""
    t, tm, i, _im = _program_tokens(pid, T, N, NP, BT)
    c = tl.arange(0, BC)
    b = tl.arange(0, BT)
    out = b[:, None, None] * (NP * BC) + i[None, :, None] * BC + c[None, None, :]
    tl.store(OFFS + out, _stream_offsets(t, i, c, N, C))
    tl.store(MASK + b, tm.to(tl.int32))


@pytest.mark.skipif(not runtime.interpreting(), reason="the probe runs through Triton's interpreter")
@pytest.mark.parametrize("n,C", [(1, 1280), (4, 4096), (8, 7168)])
def test_stream_offsets_past_two_to_the_31(n, C):
    BT, BC = runtime.BLOCK_T, 8
    T = 4 * 2**31 // (n * C) + 5  # the last program holds 5 tokens
    pid = (T - 1) // BT
    offs = torch.empty(BT, n, BC, dtype=torch.int64)
    mask = torch.empty(BT, dtype=torch.int32)
    _offsets[(1,)](offs, mask, pid, T, C, N=n, NP=runtime.stream_tile(n), BT=BT, BC=BC)
    t = torch.arange(BT, dtype=torch.int64) + pid * BT
    expected = t[:, None, None] * (n * C) + torch.arange(n)[None, :, None] * C + torch.arange(BC)[None, None, :]
    assert int(expected.max()) > 2**33
    assert torch.equal(offs, expected)
    assert mask.tolist() == (t < T).int().tolist()

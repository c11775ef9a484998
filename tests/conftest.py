import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (read
    # when the kernel modules are first imported, which mhc_fx does lazily at the first launch).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

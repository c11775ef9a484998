import os

import pytest
import torch
from torch.utils import _pytree as pytree

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (read
    # when the kernel modules are first imported, which mhc_fx does lazily at the first launch).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def float_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors in a (nested) model output, in pytree order."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

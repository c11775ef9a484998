"""Fused kernels of the mHC connection, forward and backward, as ``torch.ops.mhc_fx`` ops.

- :mod:`.ops` registers the custom ops (importing this package registers them);
- :mod:`.pre` and :mod:`.post_res` hold the Triton kernels and their launchers (imported on
  first launch, so ``TRITON_INTERPRET`` is read then);
- :mod:`.reference` is what the ops run where Triton does not (CPU without the interpreter);
- :mod:`.runtime` decides where kernels run and counts their launches.
"""

from . import custom_ops
from .runtime import launches

__all__ = ["custom_ops", "launches"]

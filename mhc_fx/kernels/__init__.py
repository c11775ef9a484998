"""Fused kernels of the mHC connection, forward and backward, as ``torch.ops.mhc_fx`` ops.

- :mod:`.custom_ops` registers the custom ops (importing this package registers them);
- :mod:`.tiles` (shared tile loads/stores and token offsets), :mod:`.pre` and
  :mod:`.post_res` hold the Triton kernels and their launchers (imported on first launch, so
  ``TRITON_INTERPRET`` is read then);
- :mod:`.cpu_path` is what the ops run where Triton does not (CPU without the interpreter),
  and what ONNX export decomposes them into;
- :mod:`.runtime` decides where kernels run (paths), picks launch configurations and counts
  launches; :mod:`.aot` compiles every kernel for GPU targets on a CPU machine (resource
  reports, tests).
"""

from . import custom_ops
from .runtime import launches

__all__ = ["custom_ops", "launches"]

"""What a forward pass saves for backward: the activation memory mHC's n streams multiply and
selective recomputation (``torch.compile(backend="mhc", options={"recompute": True})``) cuts."""

from __future__ import annotations

from typing import Callable

import torch


def saved_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn(*args, **kwargs)``
    runs (each storage counted once, however many saved tensors view it)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())

"""Fused Triton kernels for the mHC connection (forward and backward). Reserved: see issue #3."""

"""The ``mhc`` torch.compile backend and its fx passes, one per file: Sinkhorn chains, the pre
side and mixing matchers with their forward/backward checks, cross-layer merging, selective
recomputation; the fusion report."""

"""The ``mhc`` torch.compile backend and its fx passes (fusion, selective recomputation)."""

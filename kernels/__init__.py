"""Integer kernels (Triton) with their PyTorch references. Populated by the lowering work."""

"""``triton`` backend: fused kernels (placeholder until the kernels land)."""
raise ImportError("the triton kernels are not written yet")

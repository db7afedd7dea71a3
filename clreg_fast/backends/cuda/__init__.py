"""``cuda`` backend: the compiled extension ``clreg_fast._C`` (placeholder until it lands)."""
raise ImportError("the CUDA extension is not written yet")

"""The torch backend's memory claim, measured as peak RSS in separate processes on CPU."""
import pytest

from clreg_fast.bench import measure_peak_rss


@pytest.mark.slow
def test_torch_backend_peak_memory_is_at_most_a_fifth_of_reference():
    # Nf = Nr = 4096, D = 256, P = 128: the reference holds 4096 x 8192 float32 matrices and their
    # autograd graph; the torch backend one 16 MiB chunk at a time.
    shape = dict(nf=4096, nr=4096, d=256, p=128, dtype="fp32", labels=True, threads=1)
    reference = measure_peak_rss("reference", **shape)
    chunked = measure_peak_rss("torch", **shape)
    assert reference["status"] == "ok", reference
    assert chunked["status"] == "ok", chunked
    assert chunked["increase_bytes"] * 5 <= reference["increase_bytes"], (chunked, reference)

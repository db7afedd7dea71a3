"""Test setup: run the triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before any test module
imports clreg_fast.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test (the Trainer tests: steadier times on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


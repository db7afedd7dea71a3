"""Test setup: run the triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before any test module
imports clreg_fast.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

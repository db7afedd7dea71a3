"""The triton kernels as custom ops ``torch.ops.clreg_fast.triton_<name>``, for torch.compile.

Each op calls a launcher of ``ops.py``. With compiled kernels the ops are
``torch.library.triton_op``s: torch.compile traces into them and sees every launch (``ops.py``
wraps each in ``torch.library.wrap_triton``), and their fake implementation is the same function
run on fake tensors. Interpreted kernels (``TRITON_INTERPRET=1``) cannot be wrapped, so there
the ops are opaque ``torch.library.custom_op``s with shape-only fake implementations; that is
what the CPU tests compile.

``CompilableTritonKernels`` is the backend the registry hands out: in eager mode it launches
directly (no op dispatch; see ``backends/base.py``), while tracing it calls the ops.
"""
# No `from __future__ import annotations` here: torch < 2.7's custom_op evaluates string
# annotations in its own namespace, where `Tuple` is undefined.

import contextlib
import functools
from typing import Optional, Tuple

import torch

from clreg_fast.backends.base import tracing
from clreg_fast.backends.triton.ops import INTERPRET, MAX_BLOCK_P, TritonKernels

try:  # set by triton_op's own eager path; a private helper, so guarded
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - other torch layouts
    _set_wrap_triton_enabled = None

USE_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRET


def _define(name: str):
    """``triton_op`` for compiled kernels, an opaque ``custom_op`` under the interpreter."""
    qualname = f"clreg_fast::{name}"
    if USE_TRITON_OP:
        return torch.library.triton_op(qualname, mutates_args=())
    return torch.library.custom_op(qualname, mutates_args=())


def _fake(op):
    """Register a shape-only fake implementation where the op is opaque (interpreter)."""
    def register(fn):
        if not USE_TRITON_OP:
            op.register_fake(fn)
        return fn
    return register


@functools.lru_cache(maxsize=None)
def _kernels(max_block_p: int, running_max: Optional[bool]) -> TritonKernels:
    return TritonKernels(max_block_p=max_block_p, running_max=running_max)


def _direct_launches():
    """Eager launches without the wrap_triton higher-order op (as triton_op's eager path)."""
    if _set_wrap_triton_enabled is None or not USE_TRITON_OP:
        return contextlib.nullcontext()
    return _set_wrap_triton_enabled(False)


# ------------------------------------------------------------------------------ the ops

@_define("triton_project_normalize")
def triton_project_normalize(x: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor],
                             max_block_p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(z, ||y||)`` float32 with ``y = x W^T + b``, ``z = y / max(||y||, 1e-12)``."""
    return _kernels(max_block_p, None).project_normalize(x, weight, bias)


@_fake(triton_project_normalize)
def _(x, weight, bias, max_block_p):
    p = weight.shape[0] if weight is not None else x.shape[1]
    return (x.new_empty((x.shape[0], p), dtype=torch.float32),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@_define("triton_normalize_backward")
def triton_normalize_backward(dz: torch.Tensor, z: torch.Tensor,
                              norm: torch.Tensor) -> torch.Tensor:
    """Gradient through the normalization (float32)."""
    return _kernels(MAX_BLOCK_P, None).normalize_backward(dz, z, norm)


@_fake(triton_normalize_backward)
def _(dz, z, norm):
    return z.new_empty(z.shape, dtype=torch.float32)


@_define("triton_lse_forward")
def triton_lse_forward(za: torch.Tensor, zc: torch.Tensor, self_offset: int, scale: float,
                       dot_dtype: torch.dtype, max_block_p: int,
                       running_max: Optional[bool]) -> torch.Tensor:
    """Per-anchor log-sum-exp of ``scale * za . zc^T`` without the pair (i, i + self_offset)."""
    return _kernels(max_block_p, running_max).lse_forward(za, zc, self_offset, scale, dot_dtype)


@_fake(triton_lse_forward)
def _(za, zc, self_offset, scale, dot_dtype, max_block_p, running_max):
    return za.new_empty((za.shape[0],), dtype=torch.float32)


@_define("triton_lse_backward")
def triton_lse_backward(za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, w: torch.Tensor,
                        self_offset: int, scale: float, n_grad_cols: int, dot_dtype: torch.dtype,
                        need_dza: bool, max_block_p: int,
                        running_max: Optional[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dza, dzc)`` of ``backends/base.py``; dza is (0, P) without ``need_dza``."""
    dza, dzc = _kernels(max_block_p, running_max).lse_backward(
        za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype, need_dza)
    if dza is None:
        dza = za.new_empty((0, za.shape[1]), dtype=torch.float32)
    return dza, dzc


@_fake(triton_lse_backward)
def _(za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype, need_dza, max_block_p,
      running_max):
    rows = za.shape[0] if need_dza else 0
    return (za.new_empty((rows, za.shape[1]), dtype=torch.float32),
            za.new_empty((n_grad_cols, za.shape[1]), dtype=torch.float32))


# ------------------------------------------------------------------------------ the backend

class CompilableTritonKernels(TritonKernels):
    """``TritonKernels`` that call the custom ops above while torch.compile traces."""

    def project_normalize(self, x, weight, bias):
        if x.dtype == torch.float64:
            return super().project_normalize(x, weight, bias)
        if tracing():
            return torch.ops.clreg_fast.triton_project_normalize(x, weight, bias, self.max_block_p)
        with _direct_launches():
            return super().project_normalize(x, weight, bias)

    def normalize_backward(self, dz, z, norm):
        if z.dtype == torch.float64:
            return super().normalize_backward(dz, z, norm)
        if tracing():
            return torch.ops.clreg_fast.triton_normalize_backward(dz, z, norm)
        with _direct_launches():
            return super().normalize_backward(dz, z, norm)

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        if tracing():
            return torch.ops.clreg_fast.triton_lse_forward(
                za, zc, self_offset, float(scale), dot_dtype, self.max_block_p, self.running_max)
        with _direct_launches():
            return super().lse_forward(za, zc, self_offset, scale, dot_dtype)

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols,
                     dot_dtype=torch.float32, need_dza=True):
        if tracing():
            dza, dzc = torch.ops.clreg_fast.triton_lse_backward(
                za, zc, lse, w, self_offset, float(scale), n_grad_cols, dot_dtype,
                bool(need_dza), self.max_block_p, self.running_max)
            return (dza if need_dza else None), dzc
        # need_dza only when it is False: the call then matches the one-line form that
        # wrappers of TritonKernels.lse_backward written before the flag (test spies) take.
        extra = {} if need_dza else {"need_dza": False}
        with _direct_launches():
            return super().lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols,
                                        dot_dtype, **extra)


__all__ = ["CompilableTritonKernels", "USE_TRITON_OP", "triton_project_normalize",
           "triton_normalize_backward", "triton_lse_forward", "triton_lse_backward"]

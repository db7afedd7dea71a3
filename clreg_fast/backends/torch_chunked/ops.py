"""Chunked PyTorch implementation of the similarity primitives (see ``backends/base.py``).

The two primitives are also registered as custom ops ``torch.ops.clreg_fast.torch_lse_forward``
and ``torch_lse_backward``, so that ``torch.compile`` treats each as one opaque call with a
shape-only fake implementation: the Python loop over anchor chunks (whose trip count depends on
Nf) is then neither unrolled nor specialized, and varying batch sizes do not recompile.
"""
# No `from __future__ import annotations` here: torch < 2.7's custom_op evaluates string
# annotations in its own namespace, where `Tuple` is undefined.

from typing import Tuple

import torch

from clreg_fast.backends.base import SimilarityKernels, tracing

# Elements of one similarity chunk (float32), whatever N is: 16 MiB on CPU; 256 MiB on GPU,
# where fewer, larger matmuls matter more than the memory.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# At millions of columns the budget alone would leave a handful of rows per matmul on GPU;
# below this many rows per chunk, launch overhead dominates, so the chunk grows past the budget.
MIN_CHUNK_ROWS = {"cpu": 1, "cuda": 64}


def _chunk_rows(n_cols: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    floor = MIN_CHUNK_ROWS.get(device.type, 1)
    return max(floor, min(8192, budget // max(n_cols, 1)))


def _mask_self(block: torch.Tensor, row0: int, self_offset: int, fill: float) -> None:
    """Set the left-out pairs (row i, column i + self_offset) of a chunk starting at row0.

    They form one diagonal of the chunk (empty when it lies outside): no index tensors, no
    boolean mask, so no device-to-host sync on GPU.
    """
    block.diagonal(offset=row0 + self_offset).fill_(fill)


def lse_forward_chunked(za: torch.Tensor, zc: torch.Tensor, self_offset: int,
                        scale: float) -> torch.Tensor:
    lse = torch.empty(za.shape[0], dtype=za.dtype, device=za.device)
    step = _chunk_rows(zc.shape[0], zc.device)
    for r0 in range(0, za.shape[0], step):
        s = (za[r0:r0 + step] @ zc.T).mul_(scale)
        _mask_self(s, r0, self_offset, float("-inf"))
        lse[r0:r0 + step] = torch.logsumexp(s, dim=1)
    return lse


def lse_backward_chunked(za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, w: torch.Tensor,
                         self_offset: int, scale: float, n_grad_cols: int,
                         need_dza: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dza, dzc)``; without ``need_dza`` the anchor products are skipped and dza is (0, P)."""
    dza = torch.empty_like(za) if need_dza else za.new_empty((0, za.shape[1]))
    dzc = torch.zeros((n_grad_cols, zc.shape[1]), dtype=zc.dtype, device=zc.device)
    if not (need_dza or n_grad_cols):
        return dza, dzc
    step = _chunk_rows(zc.shape[0], zc.device)
    for r0 in range(0, za.shape[0], step):
        r1 = min(r0 + step, za.shape[0])
        p = (za[r0:r1] @ zc.T).mul_(scale).sub_(lse[r0:r1, None]).exp_()
        _mask_self(p, r0, self_offset, 0.0)
        p.mul_(w[r0:r1, None] * scale)  # rows now hold scale * w_i * Pr_ic
        if need_dza:
            dza[r0:r1] = p @ zc
        if n_grad_cols:
            dzc.addmm_(p[:, :n_grad_cols].T, za[r0:r1])
    return dza, dzc


@torch.library.custom_op("clreg_fast::torch_lse_forward", mutates_args=())
def torch_lse_forward(za: torch.Tensor, zc: torch.Tensor, self_offset: int,
                      scale: float) -> torch.Tensor:
    """Per-anchor log-sum-exp of ``scale * za . zc^T`` without the pair (i, i + self_offset)."""
    return lse_forward_chunked(za, zc, self_offset, scale)


@torch_lse_forward.register_fake
def _(za, zc, self_offset, scale):
    return za.new_empty(za.shape[0])


@torch.library.custom_op("clreg_fast::torch_lse_backward", mutates_args=())
def torch_lse_backward(za: torch.Tensor, zc: torch.Tensor, lse: torch.Tensor, w: torch.Tensor,
                       self_offset: int, scale: float, n_grad_cols: int,
                       need_dza: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor and column gradients of ``sum_i w_i lse_i`` (see ``backends/base.py``)."""
    return lse_backward_chunked(za, zc, lse, w, self_offset, scale, n_grad_cols, need_dza)


@torch_lse_backward.register_fake
def _(za, zc, lse, w, self_offset, scale, n_grad_cols, need_dza):
    dza = za.new_empty((za.shape[0] if need_dza else 0, za.shape[1]))
    return dza, zc.new_empty((n_grad_cols, zc.shape[1]))


class TorchChunkedKernels(SimilarityKernels):
    name = "torch"

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        if tracing():
            return torch.ops.clreg_fast.torch_lse_forward(za, zc, int(self_offset), float(scale))
        return lse_forward_chunked(za, zc, int(self_offset), float(scale))

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype=torch.float32,
                     need_dza=True):
        if tracing():
            dza, dzc = torch.ops.clreg_fast.torch_lse_backward(
                za, zc, lse, w, int(self_offset), float(scale), n_grad_cols, bool(need_dza))
        else:
            dza, dzc = lse_backward_chunked(za, zc, lse, w, int(self_offset), float(scale),
                                            n_grad_cols, bool(need_dza))
        return (dza if need_dza else None), dzc

"""Chunked PyTorch implementation of the similarity primitives (see ``backends/base.py``)."""
from __future__ import annotations

import torch

from clreg_fast.backends.base import SimilarityKernels

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


class TorchChunkedKernels(SimilarityKernels):
    name = "torch"

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        lse = torch.empty(za.shape[0], dtype=za.dtype, device=za.device)
        step = _chunk_rows(zc.shape[0], zc.device)
        for r0 in range(0, za.shape[0], step):
            s = (za[r0:r0 + step] @ zc.T).mul_(scale)
            _mask_self(s, r0, self_offset, float("-inf"))
            lse[r0:r0 + step] = torch.logsumexp(s, dim=1)
        return lse

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype=torch.float32,
                     need_dza=True):
        dza = torch.empty_like(za) if need_dza else None
        dzc = torch.zeros((n_grad_cols, zc.shape[1]), dtype=zc.dtype, device=zc.device)
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

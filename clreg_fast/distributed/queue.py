"""``RetainFeatureQueue``: retain features of earlier steps as extra negatives (MoCo-style).

A ring buffer of detached, projected and L2-normalized retain features. Each step the loss
uses the queued rows as extra negative columns (``extra_negatives=queue.negatives()``), then the
step's retain rows are pushed in (``queue.enqueue(retain, weight, bias)``), replacing the oldest
rows once the buffer is full. The rows are stale (they were projected with an earlier weight),
carry no gradient and cost only ``capacity x P`` memory, so far more negatives are seen than fit
in one batch.

With a ``process_group`` the queue gathers the rows of every rank at each ``enqueue`` (in rank
order), so every rank holds the same queue: exactly what the distributed loss wants, since extra
negatives are columns shared by all ranks.

The queue is an ``nn.Module``: its rows are a buffer (moved by ``.to(device)``), its write
position and fill level are extra state, so ``state_dict()`` / ``load_state_dict()`` save and
restore it with a checkpoint. Save its state dict next to the optimizer's, or attach it to a model
that is not wrapped in DistributedDataParallel: DDP (``broadcast_buffers=True``, the default)
would broadcast the whole buffer from rank 0 at every forward, ``capacity x dim`` numbers per
step, and overwrite a local queue's rows on the other ranks without their fill level.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clreg_fast.backends.base import NORM_EPS


class RetainFeatureQueue(nn.Module):
    """Ring buffer of ``capacity`` normalized feature rows of width ``dim``.

    Args:
        capacity: rows kept (the most recent ones).
        dim: row width: the projected width P when a projection is used, else the feature size D.
        process_group: if given, ``enqueue`` gathers the rows of every rank of this group, so all
            ranks hold the same queue. None: rows stay local (single-process training).
        device, dtype: of the buffer (float32 by default, as the kernels compute in float32); a
            CUDA device with an NCCL ``process_group``.

    Example::

        queue = RetainFeatureQueue(capacity=4096, dim=128)
        loss = fused_clreg_loss(forget, retain.detach(), proj.weight, proj.bias,
                                labels=labels, extra_negatives=queue.negatives())
        queue.enqueue(retain, proj.weight, proj.bias)  # after the loss: earlier steps only
    """

    def __init__(self, capacity: int, dim: int, *, process_group=None, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, value in (("capacity", capacity), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.capacity, self.dim = capacity, dim
        self.process_group = process_group
        self.register_buffer("features", torch.zeros(capacity, dim, device=device, dtype=dtype))
        self._next = 0    # row the next enqueue writes first
        self._filled = 0  # rows holding data (capacity once the ring has wrapped)

    def __len__(self) -> int:
        return self._filled

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.dim}, filled={self._filled}"

    def negatives(self) -> torch.Tensor:
        """The queued rows, ``(len(self), dim)``: pass as ``extra_negatives`` (no gradient)."""
        return self.features[: self._filled].detach()

    def reset(self) -> None:
        """Empty the queue (e.g. when the projection is re-initialized)."""
        self.features.zero_()
        self._next = self._filled = 0

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> int:
        """Project (``x W^T + b``), normalize and push rows; returns how many were pushed.

        With a ``process_group`` the rows of all ranks are gathered first (every rank must call
        ``enqueue``; a rank may push 0 rows). When more rows arrive than ``capacity``, only the
        last ``capacity`` of them are kept.
        """
        if self.process_group is None:
            rows = self._normalized(features, weight, bias)
        else:
            if str(dist.get_backend(self.process_group)).lower() == "nccl" and \
                    not self.features.is_cuda:
                raise ValueError(f"the queue's process_group uses NCCL, which needs CUDA tensors, "
                                 f"but the queue is on {self.features.device}; move it with "
                                 "queue.to(device)")
            # A rank with bad input still joins the row-count exchange (with a count of -1), so
            # that every rank raises instead of the others waiting in the gather.
            try:
                rows, error = self._normalized(features, weight, bias), None
            except (TypeError, ValueError, RuntimeError) as exc:  # e.g. weight on another device
                rows, error = None, exc
            rows = _gather_variable_rows(rows, self.process_group, self.features)
            if error is not None:
                raise error
        rows = rows[-self.capacity:] if rows.shape[0] > self.capacity else rows
        n = rows.shape[0]
        if n == 0:
            return 0
        first = min(n, self.capacity - self._next)  # up to the end of the buffer, then wrap
        self.features[self._next:self._next + first] = rows[:first]
        self.features[: n - first] = rows[first:]
        self._next = (self._next + n) % self.capacity
        self._filled = min(self.capacity, self._filled + n)
        return n

    def _normalized(self, x, weight, bias) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"features must be a 2-D (rows, D) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"features must be a floating tensor, got {x.dtype}")
        if weight is not None:
            if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
                raise ValueError(f"weight has shape {tuple(weight.shape)}; expected "
                                 f"(P, {x.shape[1]}) (nn.Linear convention)")
            y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        elif bias is not None:
            raise ValueError("bias was given without weight; a bias needs a projection")
        else:
            y = x
        if y.shape[1] != self.dim:
            raise ValueError(f"rows have width {y.shape[1]} after the projection but the queue "
                             f"holds rows of width dim={self.dim}")
        compute = torch.float64 if y.dtype == torch.float64 else torch.float32
        z = F.normalize(y.detach().to(compute), dim=1, eps=NORM_EPS)
        return z.to(device=self.features.device, dtype=self.features.dtype)

    # The write position and fill level travel in the state dict as extra state.
    def get_extra_state(self) -> Dict[str, Any]:
        return {"next": self._next, "filled": self._filled, "capacity": self.capacity}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"next", "filled", "capacity"} <= set(state):
            raise ValueError("RetainFeatureQueue state must hold 'next', 'filled' and 'capacity'")
        capacity, nxt, filled = int(state["capacity"]), int(state["next"]), int(state["filled"])
        if capacity != self.capacity:
            raise ValueError(f"the saved queue has capacity {capacity} but this one has "
                             f"{self.capacity}")
        if not (0 <= nxt < capacity and 0 <= filled <= capacity):
            raise ValueError(f"invalid saved queue position next={nxt}, filled={filled}")
        self._next, self._filled = nxt, filled


def _gather_variable_rows(rows: Optional[torch.Tensor], group,
                          buffer: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of every rank of ``group`` in rank order (ranks may hold different numbers).

    ``rows`` is None on a rank whose input was invalid: it returns None (its caller raises the
    real error) and every other rank raises a ValueError naming it.
    """
    world = dist.get_world_size(group)
    count = torch.tensor([-1 if rows is None else rows.shape[0]], dtype=torch.long,
                         device=buffer.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    bad = [r for r, c in enumerate(counts) if c < 0]
    if rows is None:
        return None
    if bad:
        raise ValueError(f"RetainFeatureQueue.enqueue: the rows of rank(s) {bad} of the process "
                         "group are invalid (the error is raised on those ranks); every rank "
                         "stops here")
    most = max(counts)
    if most == 0:
        return rows
    padded = rows.new_zeros((most, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])

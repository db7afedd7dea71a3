"""``CLRegLoss``: the loss as an ``nn.Module`` that may own its projection head."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from clreg_fast._validation import REDUCTIONS, check_features, check_temperature, shard_kind
from clreg_fast.functional import fused_clreg_loss


def projection_is_sharded(projection: nn.Module) -> bool:
    """Whether an engine shards ``projection``'s parameters outside its own forward.

    FSDP2 (``fully_shard`` on the projection, or its parameters left as DTensors) and
    DeepSpeed ZeRO-3 (``ds_id`` on the parameters) gather them only when the module itself is
    called; FSDP1 flattens them into one shard (an empty view outside the forward).
    """
    if type(projection).__name__.startswith("FSDP"):  # fully_shard swaps in an FSDP<cls> class
        return True
    return any(shard_kind(p) is not None for p in projection.parameters(recurse=False))


class CLRegLoss(nn.Module):
    """CLReg contrastive regularizer.

    With ``in_features`` and ``out_features`` the module owns an ``nn.Linear`` projection
    (``self.projection``) that is trained with the model; without them features are normalized
    as they come.

    When an engine shards the projection (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3), the module
    is called on the forget and retain rows (one call, so the engine gathers the parameters and
    reduces their gradient as for any layer) and the projected rows go to the loss without a
    weight; otherwise the projection runs inside the fused loss. Both give the same loss.

    Example::

        loss_fn = CLRegLoss(in_features=4096, out_features=256, temperature=0.1)
        loss = loss_fn(forget_feats, retain_feats.detach(), labels=concept_ids)
    """

    def __init__(
        self,
        in_features: Optional[int] = None,
        out_features: Optional[int] = None,
        bias: bool = True,
        temperature: float = 0.1,
        reduction: str = "mean",
        backend: str = "auto",
        device=None,
        dtype=None,
        process_group=None,
    ):
        super().__init__()
        if (in_features is None) != (out_features is None):
            raise ValueError("give both in_features and out_features for a projection, or neither")
        self.temperature = check_temperature(temperature)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.backend = backend
        self.process_group = process_group  # rows of every rank of the group (clreg_fast.distributed)
        self.projection = (
            nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
            if in_features is not None else None
        )

    def forward(self, forget: torch.Tensor, retain: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                extra_negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = bias = None
        if self.projection is not None and projection_is_sharded(self.projection):
            forget, retain = self._project_rows(forget, retain)
        elif self.projection is not None:
            weight, bias = self.projection.weight, self.projection.bias
        return fused_clreg_loss(forget, retain, weight, bias, labels=labels,
                                temperature=self.temperature, reduction=self.reduction,
                                backend=self.backend, extra_negatives=extra_negatives,
                                process_group=self.process_group)

    def _project_rows(self, forget, retain):
        check_features(forget, retain, None, None)  # the same errors as the fused path's
        if forget.shape[1] != self.projection.in_features:
            raise ValueError(f"forget has feature size {forget.shape[1]} but the projection "
                             f"takes {self.projection.in_features}")
        if retain is None:
            return self.projection(forget), None
        projected = self.projection(torch.cat([forget, retain]))
        return projected[: forget.shape[0]], projected[forget.shape[0]:]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"

"""The CLReg loss written out plainly: the readable statement of ``shared/clreg_spec.md``.

This materializes the full (Nf, Nf + Nr) similarity matrix and lets autograd differentiate
it. Every fast backend is tested against it; it is not meant to be fast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from clreg_fast._validation import check_inputs

NORM_EPS = 1e-12  # the clamp of torch.nn.functional.normalize


def clreg_loss_reference(
    forget: torch.Tensor,
    retain: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """CLReg loss in plain PyTorch with float32 math (see ``clreg_spec.md``)."""
    check_inputs(forget, retain, weight, bias, labels, temperature, reduction)
    return _reference_impl(
        forget, retain, weight, bias, labels, temperature, reduction, compute_dtype=torch.float32
    )


def _reference_impl(forget, retain, weight, bias, labels, temperature, reduction, compute_dtype):
    """The definition, computed in ``compute_dtype``.

    float32 is the public reference; tests also run it in float64 (the gold standard) and in
    bf16/fp16 (to measure how much error plain PyTorch makes in low precision).
    """
    nf = forget.shape[0]
    if retain is None:
        retain = forget.new_zeros((0, forget.shape[1]))
    x = torch.cat([forget, retain]).to(compute_dtype)
    if weight is not None:
        y = F.linear(x, weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
    else:
        y = x
    z = F.normalize(y, dim=1, eps=NORM_EPS)

    if labels is None:
        labels = torch.zeros(nf, dtype=torch.long, device=forget.device)
    labels = labels.to(forget.device, torch.long)

    logits = (z[:nf] @ z.T) / temperature                                # (Nf, Nf + Nr)
    not_self = ~torch.eye(nf, z.shape[0], dtype=torch.bool, device=z.device)
    positive = torch.zeros_like(not_self)
    positive[:, :nf] = labels[:, None] == labels[None, :]
    positive &= not_self

    lse = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    n_pos = positive.sum(dim=1)
    pos_mean = (logits * positive).sum(dim=1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    # float32 out, as the spec says; float64 stays float64 so tests can use it as the gold value
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    per_anchor = torch.where(has_pos, lse - pos_mean, torch.zeros_like(lse)).to(out_dtype)

    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    if reduction == "sum":
        return total
    return total / has_pos.sum()

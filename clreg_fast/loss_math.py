"""The O((Nf + Nr) x P) math that the single-process and distributed losses share.

Concept grouping, the closed-form positive term and its gradient, the projection backward. It
sits below ``functional`` and ``distributed.loss`` (both import it, it imports neither).

Grouping is sort based: every tensor here has Nf rows whatever the labels are (no
``torch.unique``, whose output size depends on the data), so the loss traces under
``torch.compile`` without graph breaks or host syncs. Per-concept sums are accumulated by
``index_put_(accumulate=True)`` into the slot of each concept's first row: bitwise the same on
every eager run (sequential on CPU, a sort-based kernel on CUDA, no float atomics as
``index_add_`` has on GPU). Segment sums as differences of a prefix sum over the sorted rows
were tried first: CPU ``cumsum`` along rows costs ~6 ms at 4096 x 128 (60x ``index_add_``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LabelGroups(NamedTuple):
    """Forget rows grouped by concept, as Nf-sized int64 tensors on the rows' device.

    ``first_row[i]`` is the first row (lowest index) of row i's concept, which names the
    concept; ``row_count[i]`` is the concept's size. ``n_anchors`` (rows with a positive) is a
    Python int when it was read on the host (eager mode), None otherwise.
    """

    row_count: torch.Tensor
    first_row: torch.Tensor
    n_anchors: Optional[int] = None


def group_labels(labels: torch.Tensor) -> LabelGroups:
    """Sort-based concept groups of integer ``labels`` (Nf,).

    No host sync and no data-dependent shape (unlike ``torch.unique``).
    """
    sorted_labels, order = torch.sort(labels.long(), stable=True)
    start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    end = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    # order is a permutation: the scatters write every position exactly once.
    first_row = torch.empty_like(order)
    first_row[order] = order[start]  # stable sort: a concept's first sorted row is its lowest
    row_count = torch.empty_like(order)
    row_count[order] = end - start
    return LabelGroups(row_count, first_row)


def concept_ids(groups: LabelGroups) -> torch.Tensor:
    """(Nf,) one id per concept (its first row): labels that group the rows as ``groups`` does."""
    return groups.first_row


def others_in_group(x: torch.Tensor, groups: Optional[LabelGroups]) -> torch.Tensor:
    """Row i: the sum of the other rows of row i's concept (``groups=None``: one concept).

    Accumulated in ``x.dtype`` (as the kernels accumulate float32). Deterministic:
    ``index_put_(accumulate=True)`` runs sequentially on CPU and as a sort-based kernel without
    float atomics on CUDA (always, not only under ``torch.use_deterministic_algorithms``),
    unlike ``index_add_``.
    """
    if groups is None:
        return x.sum(dim=0, keepdim=True) - x
    sums = torch.zeros_like(x).index_put_((groups.first_row,), x, accumulate=True)
    return sums[groups.first_row] - x


def positive_counts(groups: Optional[LabelGroups], nf: int, device) -> torch.Tensor:
    """(Nf,) int64: the number of positives of each forget row."""
    if groups is None:
        return torch.full((nf,), nf - 1, dtype=torch.long, device=device)
    return groups.row_count - 1


def positive_term(zf: torch.Tensor, groups: Optional[LabelGroups]):
    """Per forget row: number of positives, sum of similarities to them, the others' row sum.

    ``sum_{p in P(i)} z_i . z_p = z_i . (sum of the other rows of i's concept)``: no Nf x Nf
    product. Returns ``(n_pos, pos_sum, others)``; ``others`` is kept for ``positive_grad``.
    """
    n_pos = positive_counts(groups, zf.shape[0], zf.device)
    others = others_in_group(zf, groups)
    pos_sum = (zf * others).sum(dim=1)
    return n_pos, pos_sum, others


def positive_grad(zf, groups: Optional[LabelGroups], n_pos, others, anchor_weight, scale):
    """Gradient w.r.t. the forget rows of ``-scale * sum_i w_i * pos_sum_i / n_pos_i``."""
    q = torch.where(n_pos > 0, anchor_weight / n_pos.clamp_min(1), torch.zeros_like(anchor_weight))
    # Row j gets q_j * (its others' sum) as an anchor, and sum_{i in c, i != j} q_i z_i as a
    # positive of the other anchors of its concept.
    return -scale * (q[:, None] * others + others_in_group(zf * q[:, None], groups))


def projection_backward(forget, retain, weight, dyf, dyr, need_forget, need_retain, need_weight,
                        need_bias):
    """Gradients of the inputs and the projection from those of the pre-normalization rows.

    ``dyf``/``dyr`` may be None (rows whose gradient was not needed, or none on this rank).
    """
    grad_forget = grad_retain = grad_weight = grad_bias = None
    if weight is None:
        if need_forget:
            grad_forget = dyf.to(forget.dtype) if dyf is not None else torch.zeros_like(forget)
        if need_retain:
            grad_retain = dyr.to(retain.dtype) if dyr is not None else torch.zeros_like(retain)
        return grad_forget, grad_retain, None, None
    # Low-precision inputs: round dy to their dtype for the GEMMs (fp32 accumulation).
    dyf_c = dyf.to(forget.dtype) if dyf is not None else None
    dyr_c = dyr.to(retain.dtype) if dyr is not None else None
    if need_forget:
        grad_forget = dyf_c @ weight if dyf_c is not None else torch.zeros_like(forget)
    if need_retain:
        grad_retain = dyr_c @ weight if dyr_c is not None else torch.zeros_like(retain)
    if need_weight:
        grad_weight = torch.zeros_like(weight)
        if dyf_c is not None:
            grad_weight += dyf_c.T @ forget
        if dyr_c is not None:
            grad_weight += dyr_c.T @ retain
    if need_bias:
        db = torch.zeros(weight.shape[0], dtype=dyf.dtype if dyf is not None else torch.float32,
                         device=weight.device)
        if dyf is not None:
            db = db + dyf.sum(dim=0)
        if dyr is not None:
            db = db + dyr.sum(dim=0)
        grad_bias = db.to(weight.dtype)
    return grad_forget, grad_retain, grad_weight, grad_bias

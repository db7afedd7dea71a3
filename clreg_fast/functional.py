"""``fused_clreg_loss``: input checks, backend dispatch and the autograd function they share.

The autograd function keeps only O((Nf + Nr) x P) state for backward: the normalized features,
their norms, one log-sum-exp per anchor and the label groups. The (Nf, Nf + Nr) similarity
matrix exists only tile by tile inside the backend's two primitives (see ``backends/base.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from clreg_fast._validation import LabelGroups, check_inputs
from clreg_fast.backends import resolve_backend
from clreg_fast.backends.base import NORM_EPS, SimilarityKernels


def positive_term(zf: torch.Tensor, groups: LabelGroups):
    """Per forget row: number of positives, sum of similarities to them, label column sums.

    ``sum_{p in P(i)} z_i . z_p = z_i . u_c - z_i . z_i`` with ``u_c`` the sum of the rows of
    label c, so no Nf x Nf product is needed.
    """
    n_pos = groups.counts[groups.ids] - 1
    col_sums = zf.new_zeros((groups.counts.shape[0], zf.shape[1])).index_add_(0, groups.ids, zf)
    pos_sum = (zf * col_sums[groups.ids]).sum(dim=1) - (zf * zf).sum(dim=1)
    return n_pos, pos_sum, col_sums


def positive_grad(zf, groups: LabelGroups, n_pos, col_sums, anchor_weight, scale):
    """Gradient w.r.t. the forget rows of ``-scale * sum_i w_i * pos_sum_i / n_pos_i``."""
    q = torch.where(n_pos > 0, anchor_weight / n_pos.clamp_min(1), torch.zeros_like(anchor_weight))
    # Row j gets q_j (u_c - z_j) as an anchor and sum_{i in c, i != j} q_i z_i as a positive.
    weighted_sums = torch.zeros_like(col_sums).index_add_(0, groups.ids, zf * q[:, None])
    return -scale * (q[:, None] * (col_sums[groups.ids] - 2 * zf) + weighted_sums[groups.ids])


def check_extra_negatives(extra_negatives, forget, weight) -> Optional[torch.Tensor]:
    """Extra negative columns as the kernels take them: detached, normalized, float32 (float64).

    Rows of a feature queue are normalized already; normalizing again is a no-op up to rounding
    and guarantees the ``s <= 1`` bound the kernels' fixed-shift exponentials rely on.
    """
    if extra_negatives is None:
        return None
    if not isinstance(extra_negatives, torch.Tensor):
        raise TypeError("extra_negatives must be a torch.Tensor, got "
                        f"{type(extra_negatives).__name__}")
    width = weight.shape[0] if weight is not None else forget.shape[1]
    if extra_negatives.dim() != 2 or extra_negatives.shape[1] != width:
        raise ValueError(
            f"extra_negatives must have shape (M, {width}) (rows in the projected space), got "
            f"{tuple(extra_negatives.shape)}"
        )
    if not extra_negatives.dtype.is_floating_point:
        raise TypeError(f"extra_negatives must be a floating tensor, got {extra_negatives.dtype}")
    if extra_negatives.device != forget.device:
        raise ValueError(f"extra_negatives is on {extra_negatives.device} but forget is on "
                         f"{forget.device}")
    compute = torch.float64 if forget.dtype == torch.float64 else torch.float32
    return F.normalize(extra_negatives.detach().to(compute), dim=1, eps=NORM_EPS)


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


class CLRegFunction(torch.autograd.Function):
    """CLReg forward and backward for any backend that implements ``SimilarityKernels``."""

    @staticmethod
    def forward(ctx, forget, retain, weight, bias, groups_ids, groups_counts, temperature,
                reduction, kernels: SimilarityKernels, extra_negatives=None):
        groups = LabelGroups(groups_ids, groups_counts)
        scale = 1.0 / temperature
        nf = forget.shape[0]
        zf, norm_f = kernels.project_normalize(forget, weight, bias)
        # Extra negatives (already normalized, no gradient) are columns after the retain rows.
        extra = [] if extra_negatives is None else [extra_negatives.to(zf.dtype)]
        if retain.shape[0]:
            zr, norm_r = kernels.project_normalize(retain, weight, bias)
            z_all = torch.cat([zf, zr] + extra)
        else:
            norm_r = norm_f[:0]
            z_all = torch.cat([zf] + extra) if extra else zf

        # The positive term sees the operands the kernels' scores see (bf16/fp16 rounding).
        n_pos, pos_sum, col_sums = positive_term(kernels.dot_operands(zf, forget.dtype), groups)
        lse = kernels.lse_forward(zf, z_all, 0, scale, dot_dtype=forget.dtype)
        has_pos = n_pos > 0
        per_anchor = torch.where(has_pos, lse - scale * pos_sum / n_pos.clamp_min(1),
                                 torch.zeros_like(lse))
        out_dtype = torch.float64 if forget.dtype == torch.float64 else torch.float32
        per_anchor = per_anchor.to(out_dtype)
        n_anchors = has_pos.sum()  # stays on the device: no host sync
        if reduction == "none":
            loss = per_anchor
        elif reduction == "sum":
            loss = per_anchor.sum()
        else:
            loss = per_anchor.sum() / n_anchors

        ctx.save_for_backward(forget, retain, weight, z_all, norm_f, norm_r, lse, groups_ids,
                              groups_counts, n_pos, col_sums, n_anchors)
        ctx.nf, ctx.scale, ctx.reduction, ctx.kernels = nf, scale, reduction, kernels
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (forget, retain, weight, z_all, norm_f, norm_r, lse, ids, counts, n_pos, col_sums,
         n_anchors) = ctx.saved_tensors
        nf, scale, kernels = ctx.nf, ctx.scale, ctx.kernels
        need_forget, need_retain, need_weight, need_bias = ctx.needs_input_grad[:4]
        # Retain rows need a feature gradient for their own input or for the projection;
        # when neither asks, the retain columns' work is skipped inside the kernels.
        need_retain_z = retain.shape[0] > 0 and (need_retain or need_weight or need_bias)
        if not (need_forget or need_retain_z or need_weight or need_bias):
            return (None,) * 10

        has_pos = n_pos > 0
        grad_loss = grad_loss.to(z_all.dtype)
        if ctx.reduction == "none":
            per_anchor_grad = grad_loss
        elif ctx.reduction == "sum":
            per_anchor_grad = grad_loss.expand(nf)
        else:
            per_anchor_grad = (grad_loss / n_anchors).expand(nf)
        # where, not a product: a non-finite cotangent on an anchor without a positive (whose
        # loss is the constant 0) must not reach the gradients, as in the reference.
        anchor_weight = torch.where(has_pos, per_anchor_grad, torch.zeros_like(per_anchor_grad))

        zf = z_all[:nf]
        nr = retain.shape[0]
        n_grad_cols = nf + nr if need_retain_z else nf
        dzf, dz_cols = kernels.lse_backward(zf, z_all, lse, anchor_weight, 0, scale, n_grad_cols,
                                            dot_dtype=forget.dtype)
        dzf = dzf + dz_cols[:nf]
        dzf += positive_grad(kernels.dot_operands(zf, forget.dtype), LabelGroups(ids, counts),
                             n_pos, col_sums, anchor_weight, scale)
        dyf = kernels.normalize_backward(dzf, zf, norm_f)
        dyr = (kernels.normalize_backward(dz_cols[nf:], z_all[nf:nf + nr], norm_r)
               if need_retain_z else None)

        grad_forget, grad_retain, grad_weight, grad_bias = projection_backward(
            forget, retain, weight, dyf, dyr, need_forget, need_retain, need_weight,
            need_bias and ctx.has_bias)
        return (grad_forget, grad_retain, grad_weight, grad_bias, None, None, None, None, None,
                None)


def fused_clreg_loss(
    forget: torch.Tensor,
    retain: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    extra_negatives: Optional[torch.Tensor] = None,
    process_group=None,
) -> torch.Tensor:
    """CLReg loss of ``clreg_spec.md`` without materializing the similarity matrix.

    Args:
        forget: (Nf, D) features of forget samples, Nf >= 2.
        retain: (Nr, D) features of retain samples, or None (Nr = 0). Pass ``retain.detach()``
            to keep retain features in place: their gradient work is then skipped.
        weight: optional (P, D) projection (``nn.Linear`` convention).
        bias: optional (P,) projection bias.
        labels: optional (Nf,) integer concept ids; None puts all forget rows in one concept.
        temperature: tau > 0.
        reduction: "mean" over anchors with a positive, "sum", or "none" (an (Nf,) vector).
        backend: "auto", "reference", "torch", "triton" or "cuda" (see ``available_backends``).
        extra_negatives: optional (M, P) rows in the projected, normalized space (e.g.
            ``RetainFeatureQueue.negatives()``), used as extra negative columns after the retain
            rows, without gradient. Not supported by ``backend="reference"``.
        process_group: a ``torch.distributed`` process group: the loss then ranges over the rows
            of every rank of the group (see ``clreg_fast.distributed``); None: this process only.

    Returns:
        float32 loss (a scalar, or (Nf,) for ``reduction="none"``); float64 for float64 inputs.
    """
    if process_group is not None:
        from clreg_fast.distributed.loss import distributed_clreg_loss

        return distributed_clreg_loss(forget, retain, weight, bias, labels=labels,
                                      temperature=temperature, reduction=reduction,
                                      backend=backend, extra_negatives=extra_negatives,
                                      process_group=process_group)
    groups = check_inputs(forget, retain, weight, bias, labels, temperature, reduction)
    extra = check_extra_negatives(extra_negatives, forget, weight)
    if extra is not None and extra.shape[0] == 0:
        extra = None  # an empty queue adds nothing
    if retain is None:
        retain = forget.new_zeros((0, forget.shape[1]))
    kernels = resolve_backend(backend, forget)
    if kernels is None:  # the reference backend
        if extra is not None:
            raise ValueError("extra_negatives needs a fused backend ('torch', 'triton' or 'cuda'); "
                             "backend='reference' computes the spec's loss, which has none")
        from clreg_fast.reference import _reference_impl

        return _reference_impl(forget, retain, weight, bias, labels, float(temperature), reduction,
                               compute_dtype=torch.float64 if forget.dtype == torch.float64
                               else torch.float32)
    return CLRegFunction.apply(forget, retain, weight, bias, groups.ids, groups.counts,
                               float(temperature), reduction, kernels, extra)

"""``fused_clreg_loss``: input checks, backend dispatch and the autograd function they share.

The autograd function keeps only O((Nf + Nr) x P) state for backward: the normalized features,
their norms, one log-sum-exp per anchor and the label groups. The (Nf, Nf + Nr) similarity
matrix exists only tile by tile inside the backend's two primitives (see ``backends/base.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from clreg_fast._validation import check_extra_negatives, check_inputs
from clreg_fast.backends import resolve_backend
from clreg_fast.backends.base import SimilarityKernels
from clreg_fast.loss_math import (LabelGroups, positive_grad, positive_term,
                                  projection_backward)

__all__ = ["fused_clreg_loss", "CLRegFunction", "apply_clreg"]


def _without_autocast(device_type: str):
    """A context that turns autocast off for ``device_type`` (a no-op when it is off).

    The inputs' dtypes choose the loss's math (``clreg_spec.md``). Under autocast (a Trainer
    with ``bf16=True``) the plain-PyTorch GEMMs would run in bf16/fp16 while the fused kernels
    and the positive term stay float32: the two terms of the loss would round differently and
    the backends would disagree.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _anchor_order(groups: Optional[LabelGroups], nf: int):
    """``(order, inverse, n)``: forget rows with a positive first, so that the kernels sweep
    only the first ``n`` rows as anchors; None when every row is an anchor or the count is not
    known on the host (under torch.compile every row is swept, the weights of the rows without
    a positive being 0)."""
    if groups is None or groups.n_anchors is None or groups.n_anchors == nf:
        return None
    order = torch.sort((groups.row_count < 2).to(torch.uint8), stable=True).indices
    return order, torch.argsort(order), groups.n_anchors


class CLRegFunction(torch.autograd.Function):
    """CLReg forward and backward for any backend that implements ``SimilarityKernels``.

    Inside the kernels the forget rows may be reordered (rows with a positive first, see
    ``_anchor_order``); the positive term and every result are in the caller's row order.
    """

    @staticmethod
    def forward(ctx, forget, retain, weight, bias, extra_negatives, groups, temperature,
                reduction, kernels: SimilarityKernels):
        scale = 1.0 / temperature
        nf = forget.shape[0]
        zf, norm_f = kernels.project_normalize(forget, weight, bias)
        anchors = _anchor_order(groups, nf)
        zk = zf if anchors is None else zf[anchors[0]]  # forget rows in kernel order
        # Extra negatives (already normalized, no gradient) are columns after the retain rows.
        extra = [] if extra_negatives is None else [extra_negatives.to(zf.dtype)]
        if retain.shape[0] != 0:  # not bool(SymInt): torch 2.6 specializes that to the size
            zr, norm_r = kernels.project_normalize(retain, weight, bias)
            z_all = torch.cat([zk, zr] + extra)
        else:
            norm_r = norm_f[:0]
            z_all = torch.cat([zk] + extra) if extra else zk

        # The positive term sees the operands the kernels' scores see (bf16/fp16 rounding).
        n_pos, pos_sum, others = positive_term(kernels.dot_operands(zf, forget.dtype), groups)
        if anchors is None:
            lse = kernels.lse_forward(zk, z_all, 0, scale, dot_dtype=forget.dtype)
        else:
            order, inverse, n_anchor_rows = anchors
            lse = kernels.lse_forward(zk[:n_anchor_rows], z_all, 0, scale, dot_dtype=forget.dtype)
            lse = torch.cat([lse, lse.new_zeros(nf - n_anchor_rows)])[inverse]
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

        ctx.save_for_backward(forget, retain, weight, zf, z_all, norm_f, norm_r, lse, n_pos,
                              others, n_anchors)
        ctx.groups, ctx.anchors = groups, anchors
        ctx.nf, ctx.scale, ctx.reduction, ctx.kernels = nf, scale, reduction, kernels
        ctx.has_bias = bias is not None
        ctx.device_type = forget.device.type
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        with _without_autocast(ctx.device_type):  # a backward run inside autocast
            return CLRegFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        (forget, retain, weight, zf, z_all, norm_f, norm_r, lse, n_pos, others,
         n_anchors) = ctx.saved_tensors
        nf, scale, kernels, anchors = ctx.nf, ctx.scale, ctx.kernels, ctx.anchors
        nr = retain.shape[0]
        need_forget, need_retain, need_weight, need_bias = ctx.needs_input_grad[:4]
        need_proj = need_weight or need_bias
        # Anchor (forget) rows need a feature gradient for their own input or the projection;
        # retain rows likewise. What neither asks for is not computed (no anchor pass without
        # need_zf, no retain columns without need_zr).
        need_zf = need_forget or need_proj
        need_zr = nr > 0 and (need_retain or need_proj)
        if not (need_zf or need_zr):
            return (None,) * 9

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
        if anchors is None:
            za, lse_k, w_k = z_all[:nf], lse, anchor_weight
        else:
            order, inverse, n_anchor_rows = anchors
            rows = order[:n_anchor_rows]
            za, lse_k, w_k = z_all[:n_anchor_rows], lse[rows], anchor_weight[rows]

        dyf = dyr = None
        if need_zf:
            n_grad_cols = nf + nr if need_zr else nf
            dza, dz_cols = kernels.lse_backward(za, z_all, lse_k, w_k, 0, scale, n_grad_cols,
                                                dot_dtype=forget.dtype, need_dza=True)
            if anchors is None:
                dzf = dz_cols[:nf] + dza
            else:
                dzf = torch.cat([dza, dza.new_zeros((nf - n_anchor_rows, dza.shape[1]))])
                dzf = (dzf + dz_cols[:nf])[inverse]
            dzf += positive_grad(kernels.dot_operands(zf, forget.dtype), ctx.groups, n_pos,
                                 others, anchor_weight, scale)
            dyf = kernels.normalize_backward(dzf, zf, norm_f)
            dz_retain = dz_cols[nf:] if need_zr else None
        elif need_zr:
            # Only the retain columns: a column-only call on them (an offset of nr names none
            # of them as an anchor's own column).
            _, dz_retain = kernels.lse_backward(za, z_all[nf:nf + nr], lse_k, w_k, nr, scale, nr,
                                                dot_dtype=forget.dtype, need_dza=False)
        if need_zr:
            dyr = kernels.normalize_backward(dz_retain, z_all[nf:nf + nr], norm_r)

        grad_forget, grad_retain, grad_weight, grad_bias = projection_backward(
            forget, retain, weight, dyf, dyr, need_forget, need_retain, need_weight,
            need_bias and ctx.has_bias)
        return grad_forget, grad_retain, grad_weight, grad_bias, None, None, None, None, None


def apply_clreg(forget, retain, weight, bias, groups: Optional[LabelGroups], temperature: float,
                reduction: str, kernels: SimilarityKernels,
                extra_negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused loss on checked inputs (``retain`` a tensor, possibly with 0 rows)."""
    return CLRegFunction.apply(forget, retain, weight, bias, extra_negatives, groups,
                               float(temperature), reduction, kernels)


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
    # (a forget that is not a tensor fails the input checks inside)
    device_type = forget.device.type if isinstance(forget, torch.Tensor) else "cpu"
    with _without_autocast(device_type):
        return _fused_clreg_loss(forget, retain, weight, bias, labels, temperature, reduction,
                                 backend, extra_negatives, process_group)


def _fused_clreg_loss(forget, retain, weight, bias, labels, temperature, reduction, backend,
                      extra_negatives, process_group) -> torch.Tensor:
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
    return apply_clreg(forget, retain, weight, bias, groups, temperature, reduction, kernels,
                       extra)

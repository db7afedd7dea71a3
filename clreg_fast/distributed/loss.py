"""Exact CLReg over the rows of every rank of a ``torch.distributed`` process group.

Each rank passes its own slice of the forget rows, retain rows and labels; the loss is the CLReg
loss (``shared/clreg_spec.md``) of the concatenated global batch: forget rows in rank order,
then retain rows in rank order. Labels are global concept ids (equal ids on different ranks are
the same concept). A rank may have no forget rows or no retain rows; the group needs at least two
forget rows in all.

Gradient convention (the one DDP and FSDP expect)
--------------------------------------------------
The returned value is the global loss, the same on every rank (for ``reduction="none"``: this
rank's rows of the global per-anchor vector). Backward sends to this rank's ``forget``,
``retain``, ``weight`` and ``bias`` ``world_size`` times the gradient of the global objective
through this rank's rows, so that after DDP/FSDP average the gradients over ranks, parameter
gradients equal those of one process running the global batch. The global objective is
``mean over ranks of grad_output * loss`` for "mean"/"sum" (the grad_output is normally the same
on every rank) and, for "none", the concatenated grad_outputs of all ranks dotted with the global
per-anchor vector. Parameters that DDP/FSDP do not average must be averaged by the caller
(``all_reduce`` and divide by ``world_size``).

Every rank of the group must call the loss, and backward through it whenever any rank does
(backward runs one small collective), as with any DDP model. Passing a dedicated group
(``torch.distributed.new_group()``) keeps its collectives apart from DDP's gradient buckets.

Communication per step (P = projected width, Nf/Nr = rows of the largest rank)
-----------------------------------------------------------------------------
* forward: an all-gather of a few numbers per rank (shapes, settings and a checksum of
  ``extra_negatives``, checked to agree), an all-gather of the labels (int64, skipped without
  labels), one all-gather of the normalized projected features (``(Nf + Nr) x P`` per rank,
  never D wide), one all-gather of the per-anchor log-sum-exp (one float per forget row);
* backward: one all-reduce of the scalar grad_output ("mean"/"sum") or an all-gather of the
  per-anchor grad_outputs ("none"). No gradient matrix is communicated: each rank computes the
  row gradient of its own anchors against all global columns and the column gradient of its own
  rows against all global anchors, from the gathered features and the per-anchor scalars.

Host syncs per forward: the metadata all-gather is read on the host (the row counts size every
later gather and the agreement check raises there), and with labels the number of anchors with a
positive is read once. The ``extra_negatives`` checksum adds none: it is computed on the device
and travels inside the metadata all-gather instead of being read on its own.

The per-concept sums of the positive term are computed on every rank from the gathered forget
features, which each rank holds anyway for the negatives: no extra all-reduce is needed. They are
float-atomic-free scatters (``clreg_fast.loss_math``), so every rank gets bitwise the
same sums and loss.

``backend="reference"`` is an independent plain-autograd implementation for testing: it gathers
the raw (D wide) rows with an all-gather whose backward all-reduces the gradient, and runs the
reference loss on the concatenated batch. It communicates gradient matrices; it is not meant to
be fast, and, like the single-process reference, it takes no ``extra_negatives``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from clreg_fast._validation import (
    REDUCTIONS, check_extra_negatives, check_features, check_labels, check_temperature,
)
from clreg_fast.backends import resolve_backend
from clreg_fast.backends.base import SimilarityKernels
from clreg_fast.loss_math import (LabelGroups, concept_ids, group_labels, positive_grad,
                                  positive_term, projection_backward)

_DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0, torch.float64: 4.0}
_BACKEND_CODES = {"auto": 0.0, "reference": 1.0, "torch": 2.0, "triton": 3.0, "cuda": 4.0}

# Positions in the per-rank metadata vector every rank gathers before any real work.
(_OK, _NF, _NR, _D, _P, _DTYPE, _LABELS, _HAS_W, _HAS_B, _M, _GRAD_ON, _NEEDS_GRAD, _TEMP,
 _REDUCTION, _BACKEND, _EXTRA_SUM, _EXTRA_ABS, _META_LEN) = range(18)


class _Plan(NamedTuple):
    """What every rank knows about the global batch after the metadata exchange."""

    group: object
    rank: int
    world: int
    nf_counts: List[int]     # forget rows of every rank
    nr_counts: List[int]     # retain rows of every rank
    f_offset: int            # first global forget row of this rank
    r_offset: int            # first global retain row of this rank
    groups: Optional[LabelGroups]  # concepts of all global forget rows (None: one concept)
    n_anchors: int           # global anchors with at least one positive
    scale: float             # 1 / temperature
    reduction: str


def _gather_rows(x: torch.Tensor, counts: List[int], group, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (``counts[r]`` of them on rank r) in rank order.

    Pads to the largest count, since ``all_gather`` wants equal shapes on every backend.
    """
    most = max(counts)
    if most == 0:
        return x.new_empty((0,) + tuple(x.shape[1:]))
    padded = x.new_zeros((most,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def _nccl_only(group) -> bool:
    return str(dist.get_backend(group)).lower() == "nccl"


def _comm_device(forget, group) -> torch.device:
    """Where the metadata exchange runs: a device this group can use even for bad inputs."""
    if _nccl_only(group):
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(forget, torch.Tensor):
        return forget.device
    return torch.device("cpu")


def _local_metadata(forget, retain, weight, bias, labels, temperature, reduction, backend,
                    extra, error, device) -> torch.Tensor:
    """This rank's shapes and settings as float64 numbers (exact for counts below 2**53), on
    ``device``.

    Shapes and settings are host numbers. The checksum of ``extra`` is computed where ``extra``
    lives and written into the vector there: it reaches the host only with the metadata
    all-gather, which every step waits for anyway, so a queue adds no host sync of its own.
    """
    meta = torch.zeros(_META_LEN, dtype=torch.float64)
    meta[_OK] = 0.0 if error is not None else 1.0
    if error is not None:
        return meta.to(device)
    meta[_NF] = forget.shape[0]
    meta[_NR] = 0 if retain is None else retain.shape[0]
    meta[_D] = forget.shape[1]
    meta[_P] = weight.shape[0] if weight is not None else forget.shape[1]
    meta[_DTYPE] = _DTYPE_CODES[forget.dtype]
    meta[_LABELS] = 1.0 if labels is not None else 0.0
    meta[_HAS_W] = float(weight is not None)
    meta[_HAS_B] = float(bias is not None)
    meta[_M] = 0 if extra is None else extra.shape[0]
    grad_on = torch.is_grad_enabled()
    meta[_GRAD_ON] = float(grad_on)
    meta[_NEEDS_GRAD] = float(grad_on and any(
        t is not None and t.requires_grad for t in (forget, retain, weight, bias)))
    meta[_TEMP] = float(temperature)
    meta[_REDUCTION] = float(REDUCTIONS.index(reduction))
    meta[_BACKEND] = _BACKEND_CODES[backend]
    meta = meta.to(device)
    if extra is not None and extra.shape[0]:
        # float64 accumulation inside the reductions: no float64 copy of the queue
        checksum = torch.stack([extra.sum(dtype=torch.float64),
                                torch.linalg.vector_norm(extra, ord=1, dtype=torch.float64)])
        meta[_EXTRA_SUM:_EXTRA_ABS + 1] = checksum.to(device)
    return meta


def _check_agreement(meta: torch.Tensor) -> None:
    """Raise the same ValueError on every rank when the ranks' inputs do not fit together."""
    bad = [r for r in range(meta.shape[0]) if meta[r, _OK] != 1.0]
    if bad:
        raise ValueError(
            f"fused_clreg_loss: the inputs of rank(s) {bad} of the process group are invalid "
            "(the error is raised on those ranks); every rank stops here"
        )

    def same(column: int, what: str, ranks=None) -> None:
        values = meta[ranks if ranks is not None else slice(None), column]
        if values.numel() and not bool((values == values[0]).all()):
            raise ValueError(f"fused_clreg_loss: ranks disagree on {what}: "
                             f"{values.tolist()}; it must be the same on every rank")

    same(_D, "the feature size D of forget and retain")
    same(_P, "the projected width P (weight.shape[0])")
    same(_DTYPE, "the dtype of the features")
    same(_HAS_W, "whether a projection weight is given")
    same(_HAS_B, "whether a projection bias is given")
    same(_TEMP, "temperature")
    same(_REDUCTION, "reduction")
    same(_BACKEND, "backend")
    same(_GRAD_ON, "torch.is_grad_enabled()")
    with_rows = [r for r in range(meta.shape[0]) if meta[r, _NF] > 0]
    same(_LABELS, "whether labels are given (ranks with forget rows must all pass labels, or "
         "none of them)", with_rows)
    same(_M, "the number of extra_negatives rows (pass the same rows on every rank, e.g. a "
         "RetainFeatureQueue with a process_group)")
    sums, abs_sums = meta[:, _EXTRA_SUM], meta[:, _EXTRA_ABS]
    if not bool(((sums - sums[0]).abs() <= 1e-9 * (abs_sums[0] + 1.0)).all()):
        raise ValueError("fused_clreg_loss: extra_negatives differ across ranks; they are shared "
                         "columns and must be the same rows on every rank (use a "
                         "RetainFeatureQueue with a process_group, which gathers its rows)")
    nf_total = int(meta[:, _NF].sum())
    if nf_total < 2:
        raise ValueError(f"forget needs at least 2 rows over all ranks (an anchor and a positive), "
                         f"got {nf_total}")


def _global_groups(labels, nf_counts, meta, group, world, device):
    """Concept groups of every global forget row (the same on every rank; None: one concept)
    and the number of anchors with a positive."""
    nf_total = sum(nf_counts)
    labels_given = bool((meta[:, _LABELS] * (meta[:, _NF] > 0)).any())
    if not labels_given:
        return None, nf_total
    local = (labels.long() if labels is not None
             else torch.zeros(0, dtype=torch.long, device=device))
    all_labels = _gather_rows(local.to(device), nf_counts, group, world)
    groups = group_labels(all_labels)
    n_anchors = int((groups.row_count > 1).sum())  # the one host sync on labels
    if n_anchors == 0:
        raise ValueError(
            "no forget row has a positive: every label occurs once over all ranks, so the loss "
            "is undefined; give at least two forget rows the same label"
        )
    return groups, n_anchors


def _make_plan(forget, retain, weight, bias, labels, temperature, reduction, backend,
               extra, group):
    """Check the inputs on every rank together; returns the plan, the kernels and the inputs.

    A rank whose own inputs are invalid still joins the metadata exchange before it raises, so
    the other ranks raise too instead of waiting forever in a collective.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    error, kernels = None, None
    try:
        check_features(forget, retain, weight, bias)
        if _nccl_only(group) and not forget.is_cuda:
            raise ValueError(f"process_group uses NCCL, which needs CUDA tensors, but forget is "
                             f"on {forget.device}")
        check_temperature(temperature)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if labels is not None:
            check_labels(labels, forget.shape[0], forget.device)
        extra = check_extra_negatives(extra, forget, weight)
        kernels = resolve_backend(backend, forget)
        if kernels is None and extra is not None and extra.shape[0]:
            raise ValueError("extra_negatives needs a fused backend ('torch', 'triton' or "
                             "'cuda'); backend='reference' computes the spec's loss, which has none")
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    device = _comm_device(forget, group)
    local = _local_metadata(forget, retain, weight, bias, labels, temperature, reduction, backend,
                            extra, error, device)
    meta = _gather_rows(local[None], [1] * world, group, world).cpu()
    if error is not None:
        raise error
    _check_agreement(meta)

    nf_counts = [int(n) for n in meta[:, _NF]]
    nr_counts = [int(n) for n in meta[:, _NR]]
    groups, n_anchors = _global_groups(labels, nf_counts, meta, group, world, forget.device)
    plan = _Plan(group, rank, world, nf_counts, nr_counts, sum(nf_counts[:rank]),
                 sum(nr_counts[:rank]), groups, n_anchors, 1.0 / float(temperature), reduction)
    needs_grad = meta[:, _NEEDS_GRAD]
    return plan, kernels, extra, bool(needs_grad.any()), bool(needs_grad[rank])


def _project_normalize(kernels, x, weight, bias):
    """The backend's projection + normalization; a rank's empty block never reaches a kernel."""
    if x.shape[0] != 0:  # not bool(SymInt) (see functional.py)
        return kernels.project_normalize(x, weight, bias)
    width = weight.shape[0] if weight is not None else x.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_zeros((0, width), dtype=dtype), x.new_zeros((0,), dtype=dtype)


class DistributedCLRegFunction(torch.autograd.Function):
    """Forward and backward of the global loss for this rank's rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, forget, retain, weight, bias, extra, plan: _Plan, kernels: SimilarityKernels):
        nf, nr = forget.shape[0], retain.shape[0]
        nf_total = sum(plan.nf_counts)
        zf, norm_f = _project_normalize(kernels, forget, weight, bias)
        zr, norm_r = _project_normalize(kernels, retain, weight, bias)
        # One all-gather of [forget rows; retain rows] (P wide) per rank.
        most_f, most_r = max(plan.nf_counts), max(plan.nr_counts)
        packed = zf.new_zeros((most_f + most_r, zf.shape[1]))
        packed[:nf] = zf
        packed[most_f:most_f + nr] = zr
        parts = [torch.empty_like(packed) for _ in range(plan.world)]
        dist.all_gather(parts, packed, group=plan.group)
        columns = [p[:n] for p, n in zip(parts, plan.nf_counts)]
        columns += [p[most_f:most_f + n] for p, n in zip(parts, plan.nr_counts)]
        if extra is not None:
            columns.append(extra.to(zf.dtype))
        z_cols = torch.cat(columns)  # every global column: forget, retain, extra negatives
        del parts, packed, columns
        zf_all = z_cols[:nf_total]

        n_pos, pos_sum, others = positive_term(kernels.dot_operands(zf_all, forget.dtype),
                                                 plan.groups)
        lse_local = (kernels.lse_forward(zf, z_cols, plan.f_offset, plan.scale,
                                         dot_dtype=forget.dtype)
                     if nf else zf.new_empty(0))
        lse = _gather_rows(lse_local.to(zf.dtype), plan.nf_counts, plan.group, plan.world)
        has_pos = n_pos > 0
        per_anchor = torch.where(has_pos, lse - plan.scale * pos_sum / n_pos.clamp_min(1),
                                 torch.zeros_like(lse))
        out_dtype = torch.float64 if forget.dtype == torch.float64 else torch.float32
        per_anchor = per_anchor.to(out_dtype)
        if plan.reduction == "none":
            loss = per_anchor[plan.f_offset:plan.f_offset + nf].clone()
        elif plan.reduction == "sum":
            loss = per_anchor.sum()
        else:
            loss = per_anchor.sum() / plan.n_anchors

        ctx.save_for_backward(forget, retain, weight, z_cols, norm_f, norm_r, lse, n_pos, others)
        ctx.plan, ctx.kernels, ctx.has_bias = plan, kernels, bias is not None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        forget, retain, weight, z_cols, norm_f, norm_r, lse, n_pos, others = ctx.saved_tensors
        plan, kernels = ctx.plan, ctx.kernels
        nf, nr = forget.shape[0], retain.shape[0]
        nf_total = sum(plan.nf_counts)
        f0, r0 = plan.f_offset, plan.r_offset
        dtype = z_cols.dtype

        # Per-anchor weights of every global anchor, times world_size (the DDP convention).
        # This collective runs on every rank, before anything that depends on local needs.
        has_pos = (n_pos > 0).to(dtype)
        if plan.reduction == "none":
            grads = _gather_rows(grad_loss.to(dtype).contiguous(), plan.nf_counts, plan.group,
                                 plan.world)
            # where, not a product: a non-finite cotangent on an anchor without a positive
            # (a constant 0 loss) stays out of the gradients, as in the single-process path
            anchor_weight = torch.where(has_pos > 0, grads * plan.world, torch.zeros_like(grads))
        else:
            total = grad_loss.to(dtype).reshape(1).clone()
            dist.all_reduce(total, group=plan.group)  # sum over ranks = world * mean
            anchor_weight = total * has_pos
            if plan.reduction == "mean":
                anchor_weight = anchor_weight / plan.n_anchors

        need_forget, need_retain, need_weight, need_bias = ctx.needs_input_grad[:4]
        need_proj = need_weight or need_bias
        need_zf = nf > 0 and (need_forget or need_proj)
        need_zr = nr > 0 and (need_retain or need_proj)
        zf_all = z_cols[:nf_total]
        zf = zf_all[f0:f0 + nf]
        zr = z_cols[nf_total + r0:nf_total + r0 + nr]

        dyf = dyr = None
        if need_zf:
            w_local = anchor_weight[f0:f0 + nf]
            # Row gradient of this rank's anchors against every global column.
            dzf, _ = kernels.lse_backward(zf, z_cols, lse[f0:f0 + nf], w_local, f0, plan.scale, 0,
                                          dot_dtype=forget.dtype)
            # Column gradient of this rank's forget rows against every global anchor: a call of
            # its own, so the self pair (anchor f0 + j, column j) cannot land on a retain column.
            _, dz_col = kernels.lse_backward(zf_all, zf, lse, anchor_weight, -f0, plan.scale, nf,
                                             dot_dtype=forget.dtype, need_dza=False)
            dzf = dzf + dz_col
            dzf += positive_grad(kernels.dot_operands(zf_all, forget.dtype), plan.groups, n_pos,
                                 others, anchor_weight, plan.scale)[f0:f0 + nf]
            dyf = kernels.normalize_backward(dzf, zf, norm_f)
        if need_zr:
            # Retain columns have no self pair: an offset of nr never names one of them.
            _, dzr = kernels.lse_backward(zf_all, zr, lse, anchor_weight, nr, plan.scale, nr,
                                          dot_dtype=forget.dtype, need_dza=False)
            dyr = kernels.normalize_backward(dzr, zr, norm_r)

        grad_forget, grad_retain, grad_weight, grad_bias = projection_backward(
            forget, retain, weight, dyf, dyr, need_forget, need_retain, need_weight,
            need_bias and ctx.has_bias)
        return grad_forget, grad_retain, grad_weight, grad_bias, None, None, None


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather of rows whose backward all-reduces the global gradient and keeps this rank's
    rows: with every rank computing the same global loss, a rank's rows get the sum over ranks,
    i.e. ``world_size`` times the gradient of the global loss (the DDP convention)."""

    @staticmethod
    def forward(ctx, x, counts, offset, group, world):
        ctx.counts, ctx.offset, ctx.group, ctx.n = counts, offset, group, x.shape[0]
        return _gather_rows(x, counts, group, world)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _reference_distributed(forget, retain, weight, bias, labels, temperature, plan: _Plan,
                           any_needs_grad):
    from clreg_fast.reference import _reference_impl

    # Every rank must run the gathers' backward when any rank does (it is a collective), so
    # a rank whose own rows need no gradient stands them in with leaves that do.
    def gathered(x, counts, offset):
        if any_needs_grad and not x.requires_grad:
            x = x.detach().requires_grad_()
        return _GatherRowsWithGrad.apply(x, counts, offset, plan.group, plan.world)

    forget_all = gathered(forget, plan.nf_counts, plan.f_offset)
    retain_all = gathered(retain, plan.nr_counts, plan.r_offset)
    compute = torch.float64 if forget.dtype == torch.float64 else torch.float32
    # Concept ids stand for the labels: same groups, so the same loss.
    labels_all = concept_ids(plan.groups) if plan.groups is not None else None
    if plan.reduction != "none":
        return _reference_impl(forget_all, retain_all, weight, bias, labels_all, temperature,
                               plan.reduction, compute_dtype=compute)
    per_anchor = _reference_impl(forget_all, retain_all, weight, bias, labels_all, temperature,
                                 "none", compute_dtype=compute)
    # Each rank backpropagates only its own slice; the factor restores the convention.
    local = per_anchor[plan.f_offset:plan.f_offset + forget.shape[0]]
    return _ScaleGrad.apply(local, float(plan.world)) if local.requires_grad else local


def distributed_clreg_loss(
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
    """CLReg loss of the batch concatenated over the ranks of ``process_group``.

    The arguments are those of ``fused_clreg_loss``, each holding this rank's rows; forget may
    have 0 rows on some ranks (at least 2 in all). ``labels`` are global concept ids.
    ``extra_negatives`` are shared columns and must be the same rows on every rank (a
    ``RetainFeatureQueue`` with a process group gathers its rows so that they are).
    ``process_group=None`` here means the default (world) group.

    Returns the global loss on every rank (for ``reduction="none"``: this rank's (Nf_local,)
    rows of the global per-anchor vector). Gradients follow the DDP convention of the module
    docstring: ``world_size`` times those of the global loss.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    plan, kernels, extra, any_needs_grad, needs_grad = _make_plan(
        forget, retain, weight, bias, labels, temperature, reduction, backend, extra_negatives,
        group)
    if retain is None:
        retain = forget.new_zeros((0, forget.shape[1]))
    if kernels is None:
        return _reference_distributed(forget, retain, weight, bias, labels, float(temperature),
                                      plan, any_needs_grad)
    if extra is not None and extra.shape[0] == 0:
        extra = None
    if any_needs_grad and not needs_grad:
        # Backward runs a collective; make this rank join it although none of its own inputs
        # needs a gradient (the stand-in leaf's gradient is dropped).
        forget = forget.detach().requires_grad_()
    return DistributedCLRegFunction.apply(forget, retain, weight, bias, extra, plan, kernels)

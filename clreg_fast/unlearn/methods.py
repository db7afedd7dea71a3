"""Unlearning objectives as plain loss functions (OpenUnlearning conventions).

Every objective is ``gamma * L_forget + alpha * L_retain`` (see ``shared/anchors.md``):

==========  ===================================================================  =============
method      forget term                                                          retain term
==========  ===================================================================  =============
gradascent  -NLL(forget)                                                         none
graddiff    -NLL(forget)                                                         NLL(retain)
npo         -(2/beta) mean log sigmoid(-beta (log p(y|x) - log p_ref(y|x)))      NLL(retain)
simnpo      -(2/beta) mean log sigmoid(beta (NLL_sum / |y| - delta)), gamma 1/8  NLL(retain)
rmu         mean ||h_L - c u||^2 over answer tokens (u a fixed random unit        mean ||h_L - h_L^ref||^2
            vector, c the steering coefficient)
==========  ===================================================================  =============

NLL is the mean over answer tokens (labels != -100, shifted as in Hugging Face causal LMs); NPO
and SimNPO use the per-sequence *sum* of the answer-token NLL (a sequence log-probability).

Each function takes an optional ``normalizer``: the loss is ``sum over the rows given /
normalizer``. Left at None it is the count of those rows, i.e. an ordinary mean. The training
loop passes the count over the *global* batch (all ranks and accumulation steps), so that summing
micro-batch losses over ranks and steps gives exactly the loss of the whole batch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from clreg_fast.unlearn.data import IGNORE_INDEX

METHODS = ("gradascent", "graddiff", "npo", "simnpo", "rmu")
NEEDS_REFERENCE = {"gradascent": False, "graddiff": False, "npo": True, "simnpo": False,
                   "rmu": True}
USES_RETAIN_LOSS = {"gradascent": False, "graddiff": True, "npo": True, "simnpo": True,
                    "rmu": True}


def _divide(total: torch.Tensor, normalizer, default) -> torch.Tensor:
    denom = default if normalizer is None else normalizer
    return total / denom


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence NLL summed over answer tokens and the number of those tokens.

    Args:
        logits: (B, T, V) causal-LM logits (any float dtype; computed in float32).
        labels: (B, T) token ids, ``-100`` where nothing is learned. Position t is predicted
            from the logits at t - 1 (the Hugging Face shift).

    Returns:
        ``(nll_sum (B,) float32, n_tokens (B,) int64)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    token_nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="none").view(shift_labels.shape)
    return token_nll.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def nll_loss(logits, labels, normalizer=None) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (``sum / normalizer`` when one is given)."""
    nll_sum, n_tokens = sequence_nll(logits, labels)
    return _divide(nll_sum.sum(), normalizer, n_tokens.sum().clamp_min(1))


def gradascent_loss(forget_logits, forget_labels, normalizer=None) -> torch.Tensor:
    """GradAscent: minus the forget NLL (minimizing it raises the NLL of the forget answers)."""
    return -nll_loss(forget_logits, forget_labels, normalizer)


def graddiff_loss(forget_logits, forget_labels, retain_logits, retain_labels, gamma: float = 1.0,
                  alpha: float = 1.0, forget_normalizer=None, retain_normalizer=None
                  ) -> torch.Tensor:
    """GradDiff: ``-gamma NLL(forget) + alpha NLL(retain)``."""
    return (gamma * gradascent_loss(forget_logits, forget_labels, forget_normalizer)
            + alpha * nll_loss(retain_logits, retain_labels, retain_normalizer))


def npo_loss(nll_sum: torch.Tensor, ref_nll_sum: torch.Tensor, beta: float = 0.1,
             normalizer=None) -> torch.Tensor:
    """NPO forget term from per-sequence NLL sums of the model and of the frozen reference.

    ``log p(y|x) - log p_ref(y|x) = ref_nll_sum - nll_sum``, so the term is
    ``-(2/beta) mean log sigmoid(beta (nll_sum - ref_nll_sum))``.
    """
    _check_positive("beta", beta)
    if nll_sum.shape != ref_nll_sum.shape:
        raise ValueError(f"nll_sum {tuple(nll_sum.shape)} and ref_nll_sum "
                         f"{tuple(ref_nll_sum.shape)} must have the same shape")
    neg_log_ratio = nll_sum.float() - ref_nll_sum.float().to(nll_sum.device)
    total = -(2.0 / beta) * F.logsigmoid(beta * neg_log_ratio).sum()
    return _divide(total, normalizer, max(nll_sum.shape[0], 1))


def simnpo_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor, beta: float = 4.5,
                delta: float = 0.0, normalizer=None) -> torch.Tensor:
    """SimNPO forget term: ``-(2/beta) mean log sigmoid(beta (nll_sum / |y| - delta))``.

    No reference model: the length-normalized NLL takes the place of NPO's log-ratio. The
    method's forget weight gamma (0.125 by default) is applied by the caller.
    """
    _check_positive("beta", beta)
    mean_nll = nll_sum.float() / n_tokens.clamp_min(1).to(nll_sum.device)
    total = -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).sum()
    return _divide(total, normalizer, max(nll_sum.shape[0], 1))


def rmu_control_vector(hidden_size: int, steering: float, seed: int = 0,
                       device=None) -> torch.Tensor:
    """``steering * u / ||u||`` with u uniform in [0, 1)^D from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    u = torch.rand(hidden_size, generator=generator, dtype=torch.float32)
    return (steering * u / u.norm()).to(device)


def masked_token_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     normalizer=None) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean over masked tokens of mean_D (h - t)^2.

    ``target`` is (D,) (RMU's control vector) or (B, T, D) (the frozen model's states).
    Sequences with no masked token contribute 0 (but still count in the mean).
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, D) and mask (B, T); got {tuple(hidden.shape)} "
                         f"and {tuple(mask.shape)}")
    per_token = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_token.dtype)
    per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return _divide(per_seq.sum(), normalizer, max(hidden.shape[0], 1))


def rmu_loss(forget_hidden, forget_mask, control, retain_hidden, ref_retain_hidden, retain_mask,
             gamma: float = 1.0, alpha: float = 1.0, forget_normalizer=None,
             retain_normalizer=None) -> torch.Tensor:
    """RMU: steer forget states to ``control``; keep retain states at the frozen model's."""
    return (gamma * masked_token_mse(forget_hidden, control, forget_mask, forget_normalizer)
            + alpha * masked_token_mse(retain_hidden, ref_retain_hidden.detach(), retain_mask,
                                       retain_normalizer))


def clreg_term(forget_features: torch.Tensor, forget_labels: Optional[torch.Tensor],
               retain_features: Optional[torch.Tensor], weight=None, bias=None, *,
               temperature: float = 0.1, fallback: str = "one_concept", backend: str = "auto",
               extra_negatives: Optional[torch.Tensor] = None, process_group=None
               ) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """CLReg on pooled features, robust to mini-batches where the loss is undefined.

    ``fused_clreg_loss`` needs at least two forget rows and one label shared by two rows. When
    no label repeats (e.g. a mini-batch of distinct authors), ``fallback="one_concept"`` treats
    all forget rows as one concept ("the things to forget": pulled together, pushed away from
    retain rows) and ``fallback="skip"`` drops the term. With fewer than two forget rows the term
    is always dropped. Returns ``(loss or None, info)``; ``info`` has ``clreg_fallback`` (1.0 when
    the one-concept fallback was used) and ``clreg_skipped`` (1.0 when dropped).

    ``extra_negatives``: rows of a ``RetainFeatureQueue`` (projected, normalized) used as extra
    negative columns; fused backends only. ``process_group``: the batch is the union of every
    rank's rows (``fused_clreg_loss(process_group=)``, global concept ids); every rank of the
    group must call this, and the skip / fallback decision is taken on the global rows, so it is
    the same on every rank (a rank whose own rows have no positive still takes part).
    """
    from clreg_fast import fused_clreg_loss

    if fallback not in ("one_concept", "skip"):
        raise ValueError(f"fallback must be 'one_concept' or 'skip', got {fallback!r}")
    info = {"clreg_fallback": 0.0, "clreg_skipped": 0.0}
    labels = forget_labels
    if process_group is None:
        counted = labels
        n_rows = forget_features.shape[0]
    else:
        counted = _gather_labels(forget_features, labels, process_group)
        n_rows = counted.shape[0]
    if n_rows < 2:
        info["clreg_skipped"] = 1.0
        return None, info
    if labels is not None or process_group is not None:
        _, counts = torch.unique(counted, return_counts=True)
        if int(counts.max()) < 2:
            if fallback == "skip":
                info["clreg_skipped"] = 1.0
                return None, info
            labels = None
            info["clreg_fallback"] = 1.0
    if extra_negatives is not None and extra_negatives.shape[0] == 0:
        extra_negatives = None  # an empty queue (first step) adds nothing
    loss = fused_clreg_loss(forget_features, retain_features, weight, bias, labels=labels,
                            temperature=temperature, backend=backend,
                            extra_negatives=extra_negatives, process_group=process_group)
    return loss, info


def _gather_labels(features: torch.Tensor, labels: Optional[torch.Tensor],
                   group) -> torch.Tensor:
    """Every rank's forget labels (concept 0 where a rank passes None), in rank order.

    Two small all-gathers (row counts, then the padded labels) on the features' device, so
    every rank sees the same global rows and takes the same skip / fallback decision.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = features.device
    local = (labels.to(device=device, dtype=torch.long) if labels is not None
             else torch.zeros(features.shape[0], dtype=torch.long, device=device))
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    most = max(counts)
    if most == 0:
        return local
    padded = local.new_zeros(most)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def _check_positive(name, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")

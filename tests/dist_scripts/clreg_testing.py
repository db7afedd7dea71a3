"""Helpers shared by the distributed worker and the single-process tests.

Everything here is plain PyTorch on top of the reference implementation, so that the expected
values never come from the code under test.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from clreg_fast.reference import _reference_impl

LABEL_BASE = 2 ** 40  # concept ids far above int32, to catch a truncating label path


def make_problem(seed: int, nf_counts: List[int], nr_counts: List[int], d: int, p: Optional[int],
                 dtype=torch.float64, bias: bool = True, labels: bool = True,
                 n_concepts: int = 3) -> Dict:
    """A global batch, the same on every rank (same seed), split later by the row counts."""
    gen = torch.Generator().manual_seed(seed)
    nf, nr = sum(nf_counts), sum(nr_counts)
    prob = {
        "forget": torch.randn(nf, d, generator=gen, dtype=torch.float64).to(dtype),
        "retain": torch.randn(nr, d, generator=gen, dtype=torch.float64).to(dtype),
        "weight": None, "bias": None, "labels": None,
        "nf_counts": list(nf_counts), "nr_counts": list(nr_counts),
    }
    if p is not None:
        prob["weight"] = (torch.randn(p, d, generator=gen, dtype=torch.float64) / d ** 0.5).to(dtype)
        if bias:
            prob["bias"] = (0.3 * torch.randn(p, generator=gen, dtype=torch.float64)).to(dtype)
    if labels:
        prob["labels"] = torch.randint(0, n_concepts, (nf,), generator=gen) + LABEL_BASE
    return prob


def local_slice(prob: Dict, rank: int) -> Dict:
    """This rank's rows (fresh leaves) and the shared projection (fresh leaves)."""
    f0 = sum(prob["nf_counts"][:rank])
    r0 = sum(prob["nr_counts"][:rank])
    nf, nr = prob["nf_counts"][rank], prob["nr_counts"][rank]
    out = {
        "forget": prob["forget"][f0:f0 + nf].clone(),
        "retain": prob["retain"][r0:r0 + nr].clone(),
        "labels": None if prob["labels"] is None else prob["labels"][f0:f0 + nf].clone(),
        "weight": None if prob["weight"] is None else prob["weight"].clone(),
        "bias": None if prob["bias"] is None else prob["bias"].clone(),
        "f0": f0, "r0": r0,
    }
    return out


def reference_with_extra(forget, retain, weight, bias, labels, extra, temperature, reduction,
                         compute_dtype=torch.float64):
    """The spec's loss with ``extra`` (normalized rows, no gradient) as columns after retain.

    Built from the reference alone. Without a projection the extra rows are simply more retain
    rows (the reference normalizes them again, a no-op up to rounding). With one, every row is
    augmented so that one projection maps real rows to ``W x + b`` and extra rows to themselves:
    real rows ``[x, 1, 0]``, extra rows ``[0, 0, e]``, weight ``[W | b | I]``. Only the W and b
    blocks touch real rows, so their gradients are those of the loss with fixed extra columns.
    """
    if retain is None:
        retain = forget.new_zeros((0, forget.shape[1]))
    if extra is None:
        extra = forget.new_zeros((0, forget.shape[1] if weight is None else weight.shape[0]))
    extra = extra.detach().to(forget.dtype)
    if weight is None:
        return _reference_impl(forget, torch.cat([retain, extra]), None, None, labels, temperature,
                               reduction, compute_dtype=compute_dtype)
    p, d = weight.shape
    ones_f = forget.new_ones((forget.shape[0], 1))
    ones_r = retain.new_ones((retain.shape[0], 1))
    forget_aug = torch.cat([forget, ones_f, forget.new_zeros((forget.shape[0], p))], dim=1)
    retain_aug = torch.cat([retain, ones_r, retain.new_zeros((retain.shape[0], p))], dim=1)
    extra_aug = torch.cat([extra.new_zeros((extra.shape[0], d + 1)), extra], dim=1)
    b = bias if bias is not None else weight.new_zeros(p)
    weight_aug = torch.cat([weight, b[:, None], torch.eye(p, dtype=weight.dtype)], dim=1)
    return _reference_impl(forget_aug, torch.cat([retain_aug, extra_aug]), weight_aug, None,
                           labels, temperature, reduction, compute_dtype=compute_dtype)


def rel_err(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> float:
    """max |a - e| / max |e| (inf if exactly one of them is missing)."""
    if actual is None and expected is None:
        return 0.0
    if actual is None or expected is None:
        return float("inf")
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-30)


def leave_together(tag: str) -> None:
    """Every rank waits for all others, then tears the default process group down. A rank that
    exits while its peer is still inside a final barrier made that peer abort under gloo
    ("terminate called without an active exception", SIGABRT) once in a few runs."""
    import time

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.add(tag, 1)
    while store.add(tag, 0) < dist.get_world_size():
        time.sleep(0.01)
    dist.destroy_process_group()


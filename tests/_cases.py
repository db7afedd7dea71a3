"""Random inputs and error measures shared by the correctness tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from clreg_fast.reference import _reference_impl


@dataclass
class Case:
    nf: int
    nr: int
    d: int
    p: Optional[int]          # None: no projection
    bias: bool = True
    n_labels: Optional[int] = None  # None: labels=None (one concept)
    retain_grad: bool = True
    temperature: float = 0.1

    def __str__(self):
        return (f"nf{self.nf}-nr{self.nr}-d{self.d}-p{self.p}-b{int(self.bias)}-l{self.n_labels}"
                f"-rg{int(self.retain_grad)}-t{self.temperature}")


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """Leaf tensors for one case; labels make sure at least one concept has two rows."""
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(case.nf, case.d, generator=g)
    retain = torch.randn(case.nr, case.d, generator=g) + 0.3
    weight = bias = labels = None
    if case.p is not None:
        weight = torch.randn(case.p, case.d, generator=g) / case.d ** 0.5
        if case.bias:
            bias = torch.randn(case.p, generator=g) * 0.1
    if case.n_labels is not None:
        labels = torch.randint(0, case.n_labels, (case.nf,), generator=g)
        labels[1] = labels[0]
    tensors = []
    for t, grad in ((forget, True), (retain, case.retain_grad), (weight, True), (bias, True)):
        if t is None:
            tensors.append(None)
            continue
        t = t.to(device=device, dtype=dtype).requires_grad_(grad)
        tensors.append(t)
    if labels is not None:
        labels = labels.to(device)
    return tensors, labels


def loss_and_grads(fn, tensors, labels, case: Case, reduction: str, **kw):
    """Run ``fn`` and backprop a fixed random cotangent; return (loss, [grads or None])."""
    forget, retain, weight, bias = tensors
    loss = fn(forget, retain, weight, bias, labels=labels, temperature=case.temperature,
              reduction=reduction, **kw)
    g = torch.Generator().manual_seed(123)
    cot = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype) + 0.5
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad((loss * cot).sum(), leaves)
    out, it = [], iter(grads)
    for t in tensors:
        out.append(next(it) if t is not None and t.requires_grad else None)
    return loss.detach(), out


def reference_in(compute_dtype):
    """The reference computed in ``compute_dtype`` (float64: the gold standard)."""

    def fn(forget, retain, weight, bias, *, labels, temperature, reduction):
        return _reference_impl(forget, retain, weight, bias, labels, temperature, reduction,
                               compute_dtype=compute_dtype)

    return fn


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-2) -> float:
    """max |actual - expected| relative to max |expected|.

    ``floor`` bounds the scale from below: a value that is 0 in exact math (the loss of two
    forget rows and no retain row, say) comes out as rounding noise, which no relative measure of
    its own can judge.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(floor)
    return float((actual - expected).abs().max() / scale)


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return 0.0
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())

"""The reference against an independent float64 statement of the definition."""
import math

import pytest
import torch

from clreg_fast import clreg_loss_reference
from tests._cases import Case, loss_and_grads, make_inputs, reference_in, rel_err


def supcon_by_loops(forget, retain, weight, bias, labels, temperature, reduction):
    """SupCon over forget anchors, written anchor by anchor in float64 (no shared code)."""
    forget, retain = forget.detach().double(), retain.detach().double()
    x = torch.cat([forget, retain])
    if weight is not None:
        y = x @ weight.detach().double().T + (bias.detach().double() if bias is not None else 0)
    else:
        y = x
    z = [row / max(float(row.norm()), 1e-12) for row in y]
    nf = forget.shape[0]
    labels = [0] * nf if labels is None else [int(v) for v in labels]
    losses = []
    for i in range(nf):
        positives = [p for p in range(nf) if p != i and labels[p] == labels[i]]
        if not positives:
            losses.append(None)
            continue
        logits = {a: float(z[i] @ z[a]) / temperature for a in range(len(z)) if a != i}
        top = max(logits.values())
        lse = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        losses.append(lse - sum(logits[p] for p in positives) / len(positives))
    kept = [v for v in losses if v is not None]
    if reduction == "none":
        return torch.tensor([0.0 if v is None else v for v in losses], dtype=torch.float64)
    return torch.tensor(sum(kept) / (len(kept) if reduction == "mean" else 1), dtype=torch.float64)


CASES = [
    Case(2, 0, 5, None),
    Case(7, 4, 6, 3, n_labels=3),
    Case(9, 11, 8, 5, bias=False, n_labels=4, temperature=0.05),
    Case(6, 3, 4, None, n_labels=2, temperature=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_definition(case, reduction):
    (forget, retain, weight, bias), labels = make_inputs(case, dtype=torch.float64)
    expected = supcon_by_loops(forget, retain, weight, bias, labels, case.temperature, reduction)
    got = clreg_loss_reference(forget, retain, weight, bias, labels=labels,
                               temperature=case.temperature, reduction=reduction)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5
    gold = reference_in(torch.float64)(forget, retain, weight, bias, labels=labels,
                                       temperature=case.temperature, reduction=reduction)
    assert rel_err(gold, expected) < 1e-12


@pytest.mark.parametrize("case", CASES[1:3], ids=str)
def test_reference_gradients_gradcheck(case):
    (forget, retain, weight, bias), labels = make_inputs(case, dtype=torch.float64)
    fn = reference_in(torch.float64)

    def loss(f, r, w, *b):
        return fn(f, r, w, b[0] if b else None, labels=labels, temperature=case.temperature,
                  reduction="mean")

    inputs = [forget, retain, weight] + ([bias] if bias is not None else [])
    assert torch.autograd.gradcheck(loss, inputs)


def test_reference_float32_grads_close_to_float64():
    case = Case(13, 9, 10, 6, n_labels=3)
    t32, labels = make_inputs(case, dtype=torch.float32)
    t64, _ = make_inputs(case, dtype=torch.float64)
    l32, g32 = loss_and_grads(clreg_loss_reference, t32, labels, case, "mean")
    l64, g64 = loss_and_grads(reference_in(torch.float64), t64, labels, case, "mean")
    assert rel_err(l32, l64) < 1e-5
    for a, b in zip(g32, g64):
        assert rel_err(a, b) < 1e-4


def test_anchor_without_positive_counts_zero():
    # labels 0,0,1: the row of label 1 has no positive; it is skipped in the mean
    forget = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    per_anchor = clreg_loss_reference(forget, None, labels=labels, reduction="none")
    assert per_anchor[2] == 0
    mean = clreg_loss_reference(forget, None, labels=labels)
    assert torch.allclose(mean, per_anchor[:2].mean())

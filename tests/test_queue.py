"""RetainFeatureQueue (single process) and the ``extra_negatives`` path of fused_clreg_loss.

Expected values come from the reference: ``reference_with_extra`` (tests/dist_scripts/
clreg_testing.py) feeds queue rows through the reference with an augmented projection that maps
them to themselves, so the loss and every gradient are those of fixed extra columns.
"""
from __future__ import annotations

import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from clreg_fast import available_backends, fused_clreg_loss
from clreg_fast.distributed import RetainFeatureQueue
from clreg_fast.reference import _reference_impl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist_scripts"))
from clreg_testing import reference_with_extra  # noqa: E402

FUSED = [b for b in available_backends() if b != "reference"]


def _rows(n, d, seed, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The queue

def test_enqueue_normalizes_projects_and_wraps():
    weight, bias = _rows(3, 5, 1), _rows(1, 3, 2)[0]
    queue = RetainFeatureQueue(capacity=4, dim=3, dtype=torch.float64)
    assert len(queue) == 0 and queue.negatives().shape == (0, 3)
    first, second = _rows(3, 5, 3), _rows(2, 5, 4)
    assert queue.enqueue(first, weight, bias) == 3
    expected_first = F.normalize(F.linear(first, weight, bias), dim=1)
    torch.testing.assert_close(queue.negatives(), expected_first)
    queue.enqueue(second, weight, bias)  # 5 rows into 4 slots: the oldest row is overwritten
    expected_second = F.normalize(F.linear(second, weight, bias), dim=1)
    assert len(queue) == 4
    torch.testing.assert_close(queue.features[3], expected_second[0])
    torch.testing.assert_close(queue.features[0], expected_second[1])
    torch.testing.assert_close(queue.features[1:3], expected_first[1:3])
    torch.testing.assert_close(queue.negatives().norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert not queue.negatives().requires_grad


def test_enqueue_more_rows_than_capacity_keeps_the_last():
    queue = RetainFeatureQueue(capacity=3, dim=4, dtype=torch.float64)
    queue.enqueue(_rows(1, 4, 0))
    rows = _rows(7, 4, 1)
    queue.enqueue(rows)
    assert len(queue) == 3
    kept = {tuple(r.tolist()) for r in queue.negatives()}
    assert kept == {tuple(r.tolist()) for r in F.normalize(rows[-3:], dim=1)}


def test_enqueue_is_detached_and_float32_by_default():
    weight = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(2, 5, requires_grad=True)
    queue = RetainFeatureQueue(capacity=8, dim=3)
    queue.enqueue(x, weight)
    assert queue.features.dtype == torch.float32 and not queue.features.requires_grad
    assert x.grad is None and weight.grad is None


def test_queue_state_dict_round_trip_through_a_checkpoint():
    queue = RetainFeatureQueue(capacity=5, dim=4)
    for step in range(3):  # 9 rows into 5 slots: the write position has wrapped
        queue.enqueue(_rows(3, 4, step, torch.float32))
    buf = io.BytesIO()
    torch.save({"queue": queue.state_dict()}, buf)
    buf.seek(0)
    restored = RetainFeatureQueue(capacity=5, dim=4)
    restored.load_state_dict(torch.load(buf, weights_only=True)["queue"])
    assert len(restored) == len(queue) == 5
    assert torch.equal(restored.features, queue.features)
    more = _rows(2, 4, 9, torch.float32)  # the next rows land in the same slots
    queue.enqueue(more)
    restored.enqueue(more)
    assert torch.equal(restored.features, queue.features)


def test_queue_state_of_a_partly_filled_queue_and_reset():
    queue = RetainFeatureQueue(capacity=6, dim=2)
    queue.enqueue(_rows(2, 2, 0, torch.float32))
    restored = RetainFeatureQueue(capacity=6, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert len(restored) == 2 and torch.equal(restored.negatives(), queue.negatives())
    restored.reset()
    assert len(restored) == 0 and restored.negatives().shape == (0, 2)


def test_queue_checkpoint_mismatch_is_an_error():
    queue = RetainFeatureQueue(capacity=5, dim=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        RetainFeatureQueue(capacity=5, dim=3).load_state_dict(queue.state_dict())
    state = queue.state_dict()
    state["_extra_state"] = dict(state["_extra_state"], next=7)
    with pytest.raises(ValueError, match="invalid saved queue position"):
        RetainFeatureQueue(capacity=5, dim=4).load_state_dict(state)


def test_queue_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="capacity"):
        RetainFeatureQueue(capacity=0, dim=4)
    with pytest.raises(ValueError, match="dim"):
        RetainFeatureQueue(capacity=3, dim=-1)
    queue = RetainFeatureQueue(capacity=3, dim=4)
    with pytest.raises(ValueError, match="features must be a 2-D"):
        queue.enqueue(torch.randn(4))
    with pytest.raises(ValueError, match="width 5"):
        queue.enqueue(torch.randn(2, 5))
    with pytest.raises(ValueError, match="weight has shape"):
        queue.enqueue(torch.randn(2, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="bias was given without weight"):
        queue.enqueue(torch.randn(2, 4), None, torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        queue.enqueue(torch.ones(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# extra_negatives in fused_clreg_loss (single process)

def _problem(dtype=torch.float64, nf=7, nr=5, d=6, p=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    forget = torch.randn(nf, d, generator=gen, dtype=torch.float64).to(dtype)
    retain = torch.randn(nr, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(p, d, generator=gen, dtype=torch.float64) / d ** 0.5).to(dtype)
    bias = (0.3 * torch.randn(p, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 5, 5, 2][:nf])
    extra_raw = torch.randn(9, d, generator=gen, dtype=torch.float64).to(dtype)
    return forget, retain, weight, bias, labels, extra_raw


def test_reference_with_extra_is_the_loss_on_concatenated_rows():
    """The test helper itself: with projected raw rows as extra columns, its value equals the
    reference on retain rows extended by the raw rows."""
    forget, retain, weight, bias, labels, extra_raw = _problem()
    extra = F.normalize(F.linear(extra_raw, weight, bias), dim=1)
    helper = reference_with_extra(forget, retain, weight, bias, labels, extra, 0.1, "none")
    plain = _reference_impl(forget, torch.cat([retain, extra_raw]), weight, bias, labels, 0.1,
                            "none", compute_dtype=torch.float64)
    torch.testing.assert_close(helper, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("projection", ["weight_bias", "weight", "none"])
@pytest.mark.parametrize("retain_grad", [True, False])
def test_extra_negatives_match_reference(backend, reduction, projection, retain_grad):
    forget, retain, weight, bias, labels, extra_raw = _problem()
    if projection == "none":
        weight = bias = None
    elif projection == "weight":
        bias = None
    queue = RetainFeatureQueue(capacity=6, dim=4 if weight is not None else 6,
                               dtype=torch.float64)
    queue.enqueue(extra_raw, weight, bias)  # 9 rows, 6 kept
    extra = queue.negatives()
    # torch runs float64 (exact comparison); the kernel backends take float32 and are held to
    # the spec's float32 bar against the float64 reference.
    exact = backend == "torch"
    dtype = torch.float64 if exact else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if exact else dict(rtol=1e-4, atol=1e-5)
    grad_tol = dict(rtol=1e-9, atol=1e-12) if exact else dict(rtol=1e-4, atol=1e-5)
    ref_leaves = [forget.requires_grad_(), retain.requires_grad_(retain_grad)]
    ref_leaves += [t.requires_grad_() for t in (weight, bias) if t is not None]
    cast = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
            for t in (forget, retain, weight, bias)]
    leaves = [t for t in cast if t is not None]
    grad_out = torch.linspace(-1, 2, forget.shape[0], dtype=torch.float64) \
        if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)

    out = fused_clreg_loss(*cast, labels=labels, reduction=reduction, backend=backend,
                           extra_negatives=extra.to(dtype))
    ref = reference_with_extra(forget, retain, weight, bias, labels, extra, 0.1, reduction)
    torch.testing.assert_close(out.double(), ref, **tol)
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad],
                              grad_out.to(out.dtype))
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **grad_tol)
    # The extra columns really count: without them the loss differs.
    plain = fused_clreg_loss(*cast, labels=labels, reduction=reduction, backend=backend)
    assert not torch.allclose(out, plain)


@pytest.mark.parametrize("backend", FUSED)
def test_extra_negatives_float32_and_no_retain(backend):
    forget, _, weight, bias, labels, extra_raw = _problem(dtype=torch.float32)
    extra = F.normalize(F.linear(extra_raw, weight, bias), dim=1)
    forget.requires_grad_()
    out = fused_clreg_loss(forget, None, weight, bias, labels=labels, backend=backend,
                           extra_negatives=extra)
    (grad,) = torch.autograd.grad(out, [forget])
    f64 = forget.detach().double().requires_grad_()
    ref = reference_with_extra(f64, None, weight.double(), bias.double(), labels, extra.double(),
                               0.1, "mean")
    (ref_grad,) = torch.autograd.grad(ref, [f64])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_extra_negatives_empty_unnormalized_and_no_grad():
    forget, retain, weight, bias, labels, extra_raw = _problem()
    base = fused_clreg_loss(forget, retain, weight, bias, labels=labels, backend="torch")
    empty = fused_clreg_loss(forget, retain, weight, bias, labels=labels, backend="torch",
                             extra_negatives=torch.zeros(0, 4, dtype=torch.float64))
    assert torch.equal(base, empty)
    # Rows that are not unit length are normalized first (the kernels need s <= 1).
    raw = F.linear(extra_raw, weight, bias)
    scaled = fused_clreg_loss(forget, retain, weight, bias, labels=labels, backend="torch",
                              extra_negatives=3.0 * raw)
    unit = fused_clreg_loss(forget, retain, weight, bias, labels=labels, backend="torch",
                            extra_negatives=F.normalize(raw, dim=1))
    torch.testing.assert_close(scaled, unit, rtol=1e-12, atol=0)
    # extra rows never receive a gradient, even when they require one
    extra = F.normalize(raw, dim=1).detach().requires_grad_()
    out = fused_clreg_loss(forget.requires_grad_(), retain, weight, bias, labels=labels,
                           backend="torch", extra_negatives=extra)
    out.backward()
    assert extra.grad is None and forget.grad is not None


def test_extra_negatives_bad_input():
    forget, retain, weight, bias, labels, _ = _problem()
    with pytest.raises(ValueError, match=r"extra_negatives must have shape \(M, 4\)"):
        fused_clreg_loss(forget, retain, weight, bias, extra_negatives=torch.randn(3, 6,
                         dtype=torch.float64))
    with pytest.raises(TypeError, match="extra_negatives must be a torch.Tensor"):
        fused_clreg_loss(forget, retain, weight, bias, extra_negatives=[[1.0] * 4])
    with pytest.raises(TypeError, match="extra_negatives must be a floating"):
        fused_clreg_loss(forget, retain, weight, bias,
                         extra_negatives=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="extra_negatives needs a fused backend"):
        fused_clreg_loss(forget, retain, weight, bias, backend="reference",
                         extra_negatives=torch.randn(3, 4, dtype=torch.float64))


def test_queue_in_a_training_loop():
    """The documented pattern: loss with the queue's rows, then enqueue this step's retain."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    queue = RetainFeatureQueue(capacity=10, dim=4)
    for step in range(4):
        forget, retain = torch.randn(6, 6), torch.randn(4, 6)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        loss = fused_clreg_loss(forget, retain, proj.weight, proj.bias, labels=labels,
                                backend="torch", extra_negatives=queue.negatives())
        opt.zero_grad()
        loss.backward()
        opt.step()
        queue.enqueue(retain, proj.weight, proj.bias)
        assert len(queue) == min(10, 4 * (step + 1))
        assert torch.isfinite(loss)


def test_gathering_queue_on_cpu_with_nccl_is_a_clear_error(monkeypatch):
    """NCCL moves CUDA tensors only: a CPU queue must say so before any collective."""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    queue = RetainFeatureQueue(capacity=4, dim=3, process_group=object())
    with pytest.raises(ValueError, match="NCCL.*queue.to"):
        queue.enqueue(torch.randn(2, 3))

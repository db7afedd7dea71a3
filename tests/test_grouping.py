"""Sort-based concept grouping, the deterministic positive term, and the backward work skipped.

The grouping replaced ``torch.unique`` + ``index_add_`` (data-dependent shapes, float atomics on
GPU); these tests hold it to the old math, computed here in float64.
"""
import pytest
import torch

from clreg_fast import fused_clreg_loss
from clreg_fast.backends import resolve_backend
from clreg_fast.backends.torch_chunked import TorchChunkedKernels
from clreg_fast.loss_math import (concept_ids, group_labels, others_in_group, positive_grad,
                                  positive_term)
from clreg_fast.reference import _reference_impl


def _old_positive_math(zf, labels, anchor_weight, scale):
    """The previous implementation: dense ids by torch.unique, per-label sums by index_add_."""
    _, ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n_pos = counts[ids] - 1
    col_sums = zf.new_zeros((counts.shape[0], zf.shape[1])).index_add_(0, ids, zf)
    pos_sum = (zf * col_sums[ids]).sum(dim=1) - (zf * zf).sum(dim=1)
    q = torch.where(n_pos > 0, anchor_weight / n_pos.clamp_min(1), torch.zeros_like(anchor_weight))
    weighted = torch.zeros_like(col_sums).index_add_(0, ids, zf * q[:, None])
    grad = -scale * (q[:, None] * (col_sums[ids] - 2 * zf) + weighted[ids])
    return n_pos, pos_sum, grad


@pytest.mark.parametrize("nf, n_labels", [(2, 1), (7, 3), (33, 5), (50, 50), (41, 2)])
def test_grouping_matches_unique_and_index_add(nf, n_labels):
    g = torch.Generator().manual_seed(nf)
    # Arbitrary label values (negative, sparse, unsorted), not dense ids.
    values = torch.randint(-10**9, 10**9, (n_labels,), generator=g)
    labels = values[torch.randint(0, n_labels, (nf,), generator=g)]
    zf = torch.nn.functional.normalize(torch.randn(nf, 13, generator=g, dtype=torch.float64), dim=1)
    w = torch.rand(nf, generator=g, dtype=torch.float64)
    groups = group_labels(labels)
    for t in groups[:2]:
        assert t.shape == (nf,)  # Nf-sized whatever the labels
    n_pos, pos_sum, others = positive_term(zf, groups)
    old_n_pos, old_pos_sum, old_grad = _old_positive_math(zf, labels, w, 7.0)
    assert torch.equal(n_pos, old_n_pos)
    torch.testing.assert_close(pos_sum, old_pos_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(positive_grad(zf, groups, n_pos, others, w, 7.0), old_grad,
                               rtol=1e-12, atol=1e-12)
    # concept_ids groups the rows as the labels do
    ids = concept_ids(groups)
    assert torch.equal(ids[:, None] == ids[None, :], labels[:, None] == labels[None, :])


def test_one_concept_without_labels_matches_grouped_path():
    zf = torch.randn(9, 5, dtype=torch.float64)
    grouped = others_in_group(zf, group_labels(torch.zeros(9, dtype=torch.long)))
    torch.testing.assert_close(others_in_group(zf, None), grouped, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(others_in_group(zf, None), zf.sum(0) - zf, rtol=1e-13, atol=1e-13)


def test_group_sums_are_float32_accurate_for_many_rows():
    """20000 rows in 4000 concepts: float32 sums within float32 rounding of float64 ones."""
    nf = 20000
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4000, (nf,), generator=g)
    zf = torch.nn.functional.normalize(torch.randn(nf, 8, generator=g), dim=1)
    got = others_in_group(zf, group_labels(labels))
    want = others_in_group(zf.double(), group_labels(labels))
    assert (got.double() - want).abs().max() < 1e-5


def test_group_sums_are_bitwise_repeatable_cpu():
    labels = torch.randint(0, 7, (300,))
    zf = torch.randn(300, 16)
    a = others_in_group(zf, group_labels(labels))
    b = others_in_group(zf, group_labels(labels))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_loss_and_grads_bitwise_repeatable_gpu(backend):
    """18.5: no float atomics anywhere on the path, so two runs agree bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(0)
    forget = torch.randn(1000, 64, device="cuda", generator=g)
    retain = torch.randn(700, 64, device="cuda", generator=g)
    weight = torch.randn(32, 64, device="cuda", generator=g)
    labels = torch.randint(0, 40, (1000,), device="cuda", generator=g)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (forget, retain, weight)]
        loss = fused_clreg_loss(*leaves, labels=labels, backend=backend)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- skipped work

class _Spy(TorchChunkedKernels):
    """The torch backend, recording every similarity call."""

    def __init__(self):
        self.forward_calls, self.backward_calls = [], []

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        self.forward_calls.append((za.shape[0], zc.shape[0]))
        return super().lse_forward(za, zc, self_offset, scale, dot_dtype)

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols,
                     dot_dtype=torch.float32, need_dza=True):
        self.backward_calls.append(dict(rows=za.shape[0], cols=zc.shape[0],
                                        n_grad_cols=n_grad_cols, need_dza=need_dza))
        return super().lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype,
                                    need_dza)


@pytest.fixture
def spy(monkeypatch):
    kernels = _Spy()
    import clreg_fast.functional as functional

    monkeypatch.setattr(functional, "resolve_backend", lambda name, x: kernels)
    return kernels


def _leaves(nf=9, nr=6, d=5, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((nf, d), (nr, d), (p, d),
                                                                          (p,))]


def _check_against_reference(leaves, needs, labels, got_loss, upstream):
    ref = [t.detach().clone().requires_grad_(n) for t, n in zip(leaves, needs)]
    want = _reference_impl(*ref, labels, 0.1, "none", compute_dtype=torch.float64)
    torch.testing.assert_close(got_loss.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    (want * upstream).sum().backward()
    return ref


@pytest.mark.parametrize("needs", [(False, True, False, False), (True, True, False, False),
                                   (False, False, True, True), (True, False, False, False)])
def test_backward_asks_only_for_the_needed_gradients(spy, needs):
    leaves = _leaves()
    inputs = [t.clone().requires_grad_(n) for t, n in zip(leaves, needs)]
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    loss = fused_clreg_loss(*inputs, labels=labels, reduction="none")
    upstream = torch.rand(9, dtype=torch.float64)
    (loss * upstream).sum().backward()
    need_forget, need_retain, need_proj = needs[0], needs[1], needs[2] or needs[3]
    (call,) = spy.backward_calls
    # The anchor pass only when the forget rows (or the projection) need a gradient.
    assert call["need_dza"] == (need_forget or need_proj)
    if not (need_forget or need_proj):
        assert call["cols"] == call["n_grad_cols"] == 6  # the retain columns only
    elif need_retain or need_proj:
        assert call["n_grad_cols"] == 9 + 6
    else:
        assert call["n_grad_cols"] == 9
    ref = _check_against_reference(leaves, needs, labels, loss, upstream)
    for got, want, n in zip(inputs, ref, needs):
        if n:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-10)
        else:
            assert got.grad is None


def test_no_backend_call_when_nothing_needs_a_gradient(spy):
    leaves = _leaves()
    loss = fused_clreg_loss(leaves[0].requires_grad_(False), leaves[1])
    assert not loss.requires_grad
    assert spy.backward_calls == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_anchors_without_a_positive_are_not_swept(spy, reduction):
    leaves = _leaves(nf=10)
    inputs = [t.clone().requires_grad_() for t in leaves]
    # rows 1, 4 and 8 are alone in their concept: 7 anchors
    labels = torch.tensor([5, 9, 5, 7, 11, 7, 7, 3, 13, 3])
    loss = fused_clreg_loss(*inputs, labels=labels, reduction=reduction)
    upstream = torch.rand(10, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    (loss * upstream).sum().backward()
    assert spy.forward_calls == [(7, 10 + 6)]
    assert [c["rows"] for c in spy.backward_calls] == [7]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    want = _reference_impl(*ref, labels, 0.1, reduction, compute_dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    (want * upstream).sum().backward()
    for got, w in zip(inputs, ref):
        torch.testing.assert_close(got.grad, w.grad, rtol=1e-9, atol=1e-10)
    if reduction == "none":
        assert torch.all(loss.detach()[[1, 4, 8]] == 0)


def test_registry_hands_out_the_torch_backend_object_once():
    a = resolve_backend("torch", torch.empty(1))
    assert a is resolve_backend("torch", torch.empty(1))


def test_distributed_loss_does_not_import_functional():
    """The shared math lives below both: distributed/loss.py -> loss_math, never functional."""
    import ast
    import inspect

    import clreg_fast.distributed.loss as dist_loss
    import clreg_fast.loss_math as loss_math

    def imported(module):
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert "clreg_fast.functional" not in imported(dist_loss)
    assert "clreg_fast.loss_math" in imported(dist_loss)
    assert not {m for m in imported(loss_math) if m and m.startswith("clreg_fast.")} - {
        "clreg_fast.backends.base"}


def test_loss_never_calls_index_add(monkeypatch):
    """18.5: index_add_ accumulates with float atomics on GPU; the loss must not use it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("index_add_ called")

    monkeypatch.setattr(torch.Tensor, "index_add_", forbidden)
    monkeypatch.setattr(torch.Tensor, "index_add", forbidden)
    monkeypatch.setattr(torch, "index_add", forbidden)
    forget = torch.randn(12, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 9])
    fused_clreg_loss(forget, torch.randn(4, 5), labels=labels, backend="torch").backward()
    assert forget.grad is not None

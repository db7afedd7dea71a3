"""Token-level scale: Nf = Nr = 10**6 rows of P = 128 through fused_clreg_loss on one GPU.

Token-level CLReg (one row per answer token) runs into millions of rows. These tests run the
GPU backends at Nf = Nr = 10**6 (D = 256 projected to P = 128) and compare them with the
chunked PyTorch backend (float32 math, with large chunks so that it finishes in about a
minute): the full loss and every gradient for float32 inputs; for bf16 inputs a per-anchor
error bar on a slice of anchors (at most twice the error plain PyTorch makes with bf16
similarities) and finite, well-aligned gradients. The distributed path is run at the same size
on a one-rank NCCL group and must agree with the single-process call.

They need a CUDA GPU (marker ``gpu``) and take minutes (marker ``slow``); the helpers take a
device and a row count so the logic can be dry-run small on CPU (see ``_dry_run`` below).
"""
from __future__ import annotations

import pytest
import torch

from clreg_fast import available_backends, fused_clreg_loss
from clreg_fast.backends.torch_chunked import ops as torch_ops

ROWS, D, P = 10 ** 6, 256, 128
GPU_BACKENDS = ("triton", "cuda")
BIG_CHUNK = 1 << 31  # float32 elements per similarity chunk of the torch backend (8 GiB)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def make_problem(rows: int, device, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    forget = torch.randn(rows, D, generator=gen, device=device)
    retain = torch.randn(rows, D, generator=gen, device=device)
    weight = torch.randn(P, D, generator=gen, device=device) / D ** 0.5
    bias = 0.1 * torch.randn(P, generator=gen, device=device)
    # ~100 token rows per concept, as token-level features labelled by concept would have.
    labels = torch.randint(0, max(2, rows // 100), (rows,), generator=gen, device=device)
    return [t.to(dtype) for t in (forget, retain, weight, bias)] + [labels]


def run(backend, forget, retain, weight, bias, labels, *, retain_grad=False, reduction="mean",
        process_group=None):
    """Forward + backward; returns the loss and the gradients of (forget, retain, weight, bias)."""
    leaves = [forget.clone().requires_grad_(), retain.clone().requires_grad_(retain_grad),
              weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    loss = fused_clreg_loss(*leaves, labels=labels, backend=backend, reduction=reduction,
                            process_group=process_group)
    loss.backward(torch.ones_like(loss))
    if loss.is_cuda:
        torch.cuda.synchronize()
    return loss.detach(), [t.grad for t in leaves]


def run_torch_backend(*problem, **kw):
    """The chunked PyTorch backend with chunks large enough to finish at 10**6 rows."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_ops, "CHUNK_ELEMENTS", {"cpu": BIG_CHUNK, "cuda": BIG_CHUNK})
        return run("torch", *problem, **kw)


def norm_err(got, want) -> float:
    """||got - want|| / ||want|| in float64 (gradients hold many near-zero entries)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def per_anchor_slice(forget, retain, weight, bias, labels, lo, hi, bf16_dots):
    """Per-anchor losses of anchors lo..hi-1 in plain PyTorch (float32 or bf16 similarities),
    at the default temperature 0.1."""
    zf = torch.nn.functional.normalize(torch.nn.functional.linear(forget, weight, bias).float(),
                                       dim=1)
    zr = torch.nn.functional.normalize(torch.nn.functional.linear(retain, weight, bias).float(),
                                       dim=1)
    cols = torch.cat([zf, zr])
    cols_bf16 = cols.bfloat16()
    _, ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], P, device=zf.device).index_add_(0, ids, zf)
    out = []
    for a0 in range(lo, hi, 256):
        a1 = min(a0 + 256, hi)
        za = zf[a0:a1]
        if bf16_dots:
            s = (za.bfloat16() @ cols_bf16.T).float() * 10.0
        else:
            s = (za @ cols.T) * 10.0
        s[torch.arange(a1 - a0), torch.arange(a0, a1)] = float("-inf")
        lse = torch.logsumexp(s, dim=1)
        n_pos = counts[ids[a0:a1]] - 1
        pos = (za * sums[ids[a0:a1]]).sum(1) - (za * za).sum(1)
        out.append(torch.where(n_pos > 0, lse - 10.0 * pos / n_pos.clamp_min(1),
                               torch.zeros_like(lse)))
    return torch.cat(out)


@pytest.fixture(scope="module")
def problem_fp32():
    return make_problem(ROWS, "cuda")


@pytest.fixture(scope="module")
def torch_fp32(problem_fp32):
    return run_torch_backend(*problem_fp32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_million_rows_fp32_matches_torch_backend(backend, problem_fp32, torch_fp32):
    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    loss, grads = run(backend, *problem_fp32)
    ref_loss, ref_grads = torch_fp32
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    for name, g, r in zip(("forget", "weight", "bias"), (grads[0], grads[2], grads[3]),
                          (ref_grads[0], ref_grads[2], ref_grads[3])):
        assert torch.isfinite(g).all(), name
        assert norm_err(g, r) < 1e-3, (name, norm_err(g, r))
    assert grads[1] is None  # retain was detached: no retain-side work


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_million_rows_bf16(backend, problem_fp32, torch_fp32):
    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    problem = [t.bfloat16() if t.is_floating_point() else t for t in problem_fp32]
    per_anchor, _ = run(backend, *problem, reduction="none")
    lo, hi = ROWS // 2, ROWS // 2 + 2048
    exact = per_anchor_slice(*problem, lo, hi, bf16_dots=False)
    plain_bf16 = per_anchor_slice(*problem, lo, hi, bf16_dots=True)
    fused_err = float((per_anchor[lo:hi] - exact).abs().max())
    plain_err = float((plain_bf16 - exact).abs().max())
    assert fused_err <= 2 * plain_err + 1e-5, (fused_err, plain_err)

    loss, grads = run(backend, *problem, retain_grad=True)
    assert torch.isfinite(loss)
    _, ids, counts = torch.unique(problem[4], return_inverse=True, return_counts=True)
    n_anchors = (counts[ids] > 1).sum()
    torch.testing.assert_close(loss, per_anchor.sum() / n_anchors, rtol=1e-5, atol=0)
    for name, g in zip(("forget", "retain", "weight", "bias"), grads):
        assert g is not None and torch.isfinite(g).all(), name
    # Same direction as the float32 gradients of the unrounded inputs (retain differs: there
    # the float32 run had no retain gradient).
    for name, g, r in zip(("forget", "weight", "bias"), (grads[0], grads[2], grads[3]),
                          (torch_fp32[1][0], torch_fp32[1][2], torch_fp32[1][3])):
        assert cosine(g, r) > 0.99, (name, cosine(g, r))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_million_rows_distributed_one_rank(backend, problem_fp32):
    """The distributed path (a one-rank NCCL group) at 10**6 rows equals the plain call."""
    import torch.distributed as dist

    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    problem = [t.bfloat16() if t.is_floating_point() else t for t in problem_fp32]
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loss, grads = run(backend, *problem, retain_grad=True, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    ref_loss, ref_grads = run(backend, *problem, retain_grad=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g, r in zip(("forget", "retain", "weight", "bias"), grads, ref_grads):
        assert norm_err(g, r) < 1e-2, (name, norm_err(g, r))


def _dry_run(rows: int = 3000) -> None:
    """The checks above at a small size on CPU with the torch backend standing in for a GPU one
    (``python -c "import tests.test_token_scale as t; t._dry_run()"``)."""
    problem = make_problem(rows, "cpu")
    loss, grads = run("torch", *problem)
    ref_loss, ref_grads = run_torch_backend(*problem)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    assert all(norm_err(g, r) < 1e-3 for g, r in zip(grads[::2], ref_grads[::2]))
    per_anchor, _ = run("torch", *problem, reduction="none")
    exact = per_anchor_slice(*problem, rows // 2, rows // 2 + 300, bf16_dots=False)
    plain = per_anchor_slice(*problem, rows // 2, rows // 2 + 300, bf16_dots=True)
    print("fused err", float((per_anchor[rows // 2:rows // 2 + 300] - exact).abs().max()),
          "plain bf16 err", float((plain - exact).abs().max()))

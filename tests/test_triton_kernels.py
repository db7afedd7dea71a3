"""Kernel-level tests of the triton backend, and fused_clreg_loss(backend="triton") end to end.

Without a GPU the kernels run in the triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small but deliberately odd: no size is a multiple of the
block sizes, P is not a power of two, and ``max_block_p=16`` forces the tiled-P code paths.
With a GPU the same tests run on CUDA tensors through compiled kernels.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from clreg_fast import clreg_loss_reference, fused_clreg_loss  # noqa: E402
from clreg_fast.backends import available_backends  # noqa: E402
from clreg_fast.backends.base import NORM_EPS, SimilarityKernels  # noqa: E402
from clreg_fast.backends.torch_chunked import TorchChunkedKernels  # noqa: E402
from clreg_fast.reference import _reference_impl  # noqa: E402

if "triton" not in available_backends():
    pytest.skip("the triton backend is not usable here (no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from clreg_fast.backends.triton import TritonKernels  # noqa: E402
from clreg_fast.backends.triton import kernels as triton_kernels  # noqa: E402
from clreg_fast.backends.triton import ops as triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT = TritonKernels()
TILED = TritonKernels(max_block_p=16)  # P = 24 or 40 then spans 2 or 3 feature tiles
TORCH = TorchChunkedKernels()
LOW_PRECISION = (torch.bfloat16, torch.float16)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (both in float64)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def unit_rows(n: int, p: int, seed: int, zero_rows=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=1)
    z[list(zero_rows)] = 0.0
    return z.float().to(DEVICE)


def lse_float64(za, zc, self_offset, scale, round_to=None):
    """The lse primitive in float64, optionally on operands rounded to a low-precision dtype."""
    if round_to is not None:
        za, zc = za.to(round_to), zc.to(round_to)
    s = (za.double() @ zc.double().T) * scale
    rows = torch.arange(za.shape[0], device=za.device)
    cols = rows + self_offset
    keep = (cols >= 0) & (cols < zc.shape[0])
    s[rows[keep], cols[keep]] = float("-inf")
    return torch.logsumexp(s, dim=1), s


def lse_backward_float64(za, zc, lse, w, self_offset, scale, n_grad_cols):
    _, s = lse_float64(za, zc, self_offset, scale)
    p = torch.exp(s - lse.double()[:, None]) * (scale * w.double())[:, None]
    return p @ zc.double(), p[:, :n_grad_cols].T @ za.double()


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("kernels", [DEFAULT, TILED], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p,with_bias", [(24, True), (40, False)])
def test_project_normalize_matches_float64(kernels, dtype, p, with_bias):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(37, 19, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(p, 19, generator=g) / 4).to(DEVICE, dtype)
    bias = torch.randn(p, generator=g).to(DEVICE, dtype) if with_bias else None
    x[5] = 0.0  # a zero row: y = b (or 0 without a bias)
    z, norm = kernels.project_normalize(x, weight, bias)
    assert z.dtype == norm.dtype == torch.float32
    assert z.shape == (37, p) and norm.shape == (37,)

    # Products of the (exactly representable) inputs, accumulated in float32: float64 math on
    # the same input values is the right yardstick for every input dtype.
    y = x.double() @ weight.double().T + (bias.double() if with_bias else 0.0)
    want_norm = y.norm(dim=1)
    want_z = y / want_norm.clamp_min(NORM_EPS)[:, None]
    assert rel_err(norm, want_norm) < 1e-5
    assert (z.double() - want_z).abs().max().item() < 1e-5
    if not with_bias:
        assert norm[5].item() == 0.0 and z[5].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [19, 100])  # 100 > the interpreter's 64-wide normalization tile
def test_normalize_without_projection_matches_base(dtype, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(37, d, generator=g).to(DEVICE, dtype)
    x[3] = 0.0
    x[7] = 1e-14  # under the 1e-12 clamp
    z, norm = DEFAULT.project_normalize(x, None, None)
    z_base, norm_base = SimilarityKernels().project_normalize(x, None, None)
    assert rel_err(norm, norm_base) < 1e-6
    assert (z - z_base).abs().max().item() < 1e-6
    assert z[3].abs().max().item() == 0.0


def test_project_normalize_noncontiguous_and_empty():
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(19, 37, generator=g).to(DEVICE)
    w_t = torch.randn(24, 38, generator=g).to(DEVICE)[:, ::2]  # a strided column view
    x = x_t.T
    assert not x.is_contiguous() and not w_t.is_contiguous()
    z, norm = DEFAULT.project_normalize(x, w_t, None)
    z_want, norm_want = DEFAULT.project_normalize(x.contiguous(), w_t.contiguous(), None)
    assert torch.equal(z, z_want) and torch.equal(norm, norm_want)
    z0, n0 = DEFAULT.project_normalize(x[:0], w_t, None)
    assert z0.shape == (0, 24) and n0.shape == (0,)


@pytest.mark.parametrize("p", [24, 100])
def test_normalize_backward_matches_base(p):
    g = torch.Generator().manual_seed(p)
    y = torch.randn(37, p, generator=g, dtype=torch.float64)
    y[2] = 0.0      # zero row: dz / eps
    y[4] *= 1e-14   # a row under the clamp
    norm = y.norm(dim=1)
    z = y / norm.clamp_min(NORM_EPS)[:, None]
    dz = torch.randn(37, p, generator=g, dtype=torch.float64)
    want = SimilarityKernels().normalize_backward(dz, z, norm)  # float64 plain torch
    got = DEFAULT.normalize_backward(dz.float().to(DEVICE), z.float().to(DEVICE),
                                     norm.float().to(DEVICE))
    assert got.dtype == torch.float32
    # rows 2 and 4 are huge (dz / eps); compare every row against its own scale
    row_err = (got.double().cpu() - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert row_err.max().item() < 1e-5
    # and against autograd through F.normalize for the ordinary rows
    y_req = y.clone().requires_grad_(True)
    torch.nn.functional.normalize(y_req, dim=1, eps=NORM_EPS).backward(dz)
    assert rel_err(got[5:].cpu(), y_req.grad[5:]) < 1e-5


# --------------------------------------------------------------------------- log-sum-exp


LSE_CASES = [
    # (Na, Nc, P, self_offset, zc is za)
    pytest.param(37, 53, 24, 0, False, id="odd_sizes"),
    pytest.param(37, 53, 40, 0, False, id="p40"),
    pytest.param(37, 37, 24, 0, True, id="retain_empty"),
    pytest.param(2, 2, 24, 0, True, id="nf2_nr0"),
    pytest.param(37, 53, 24, 9, False, id="offset_pos"),
    pytest.param(37, 53, 24, -5, False, id="offset_neg"),
    pytest.param(17, 20, 40, 30, False, id="offset_past_end"),
]


def _lse_inputs(na, nc, p, same):
    za = unit_rows(na, p, seed=na + p, zero_rows=(1,) if na > 2 else ())
    zc = za if same else unit_rows(nc, p, seed=nc * p, zero_rows=(nc - 2,))
    return za, zc


@pytest.mark.parametrize("kernels", [DEFAULT, TILED], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("tau", [0.1, 0.01], ids=["fixed_shift", "running_max"])
@pytest.mark.parametrize("na,nc,p,offset,same", LSE_CASES)
def test_lse_forward_matches_float64_and_torch(kernels, tau, na, nc, p, offset, same):
    za, zc = _lse_inputs(na, nc, p, same)
    scale = 1.0 / tau
    lse = kernels.lse_forward(za, zc, offset, scale)
    want, _ = lse_float64(za, zc, offset, scale)
    assert lse.dtype == torch.float32 and lse.shape == (na,)
    # float32 scores carry ~1e-7 * scale of absolute error
    assert (lse.double() - want).abs().max().item() < 2e-6 * scale
    assert (lse - TORCH.lse_forward(za, zc, offset, scale)).abs().max().item() < 2e-6 * scale


def test_lse_paths_are_chosen_by_temperature_and_agree():
    assert DEFAULT._fixed_shift(10.0) and not DEFAULT._fixed_shift(100.0)
    za, zc = _lse_inputs(37, 53, 24, False)
    fixed = TritonKernels(running_max=False).lse_forward(za, zc, 0, 10.0)
    running = TritonKernels(running_max=True).lse_forward(za, zc, 0, 10.0)
    assert (fixed - running).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0)
def test_running_max_survives_where_a_fixed_shift_underflows():
    # Every column points away from the anchor: with scale 100, exp(s * scale - scale) = e^-200
    # underflows to 0 and a fixed shift would give -inf; the running max gives -100 + log(n).
    za = torch.zeros(3, 24, device=DEVICE)
    za[:, 0] = 1.0
    zc = -za[:1].expand(21, 24).contiguous()
    lse = DEFAULT.lse_forward(za, zc, 100, 100.0)
    assert torch.allclose(lse.double().cpu(), torch.full((3,), -100.0 + math.log(21),
                                                         dtype=torch.float64), atol=1e-4)
    forced = TritonKernels(running_max=False).lse_forward(za, zc, 100, 100.0)
    assert torch.isinf(forced).all()  # why the launcher switches paths at small tau


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_lse_forward_no_valid_column_is_minus_inf():
    za = unit_rows(2, 24, seed=0)
    lse = DEFAULT.lse_forward(za, za[:1], 0, 10.0)  # row 0's only column is itself
    assert lse[0].item() == float("-inf") and math.isfinite(lse[1].item())
    lse_r = TritonKernels(running_max=True).lse_forward(za, za[:1], 0, 10.0)
    assert lse_r[0].item() == float("-inf")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kernels", [DEFAULT, TILED], ids=["one_tile", "tiled"])
def test_lse_forward_rounds_operands_to_the_input_dtype(dtype, kernels):
    """bf16/fp16 inputs: products of operands rounded to that dtype, float32 accumulation."""
    za, zc = _lse_inputs(37, 53, 40, False)
    lse = kernels.lse_forward(za, zc, 0, 10.0, dot_dtype=dtype)
    rounded, _ = lse_float64(za, zc, 0, 10.0, round_to=dtype)
    exact, _ = lse_float64(za, zc, 0, 10.0)
    assert (lse.double() - rounded).abs().max().item() < 2e-5
    # the rounding really happened: the unrounded value is measurably different
    assert (rounded - exact).abs().max().item() > 10 * (lse.double() - rounded).abs().max().item()


# The tiled kernels recompute scores per output tile: slow in the interpreter, so they get
# a subset that still covers P = 40 (3 tiles), offsets and the Nr = 0 layout.
LSE_BACKWARD_CASES = [
    pytest.param(DEFAULT, tau, *case.values, id=f"one_tile-tau{tau}-{case.id}")
    for tau in (0.1, 0.01) for case in LSE_CASES
] + [
    pytest.param(TILED, tau, *case.values, id=f"tiled-tau{tau}-{case.id}")
    for tau, case in ((0.1, LSE_CASES[1]), (0.01, LSE_CASES[5]), (0.1, LSE_CASES[2]))
]


@pytest.mark.parametrize("kernels,tau,na,nc,p,offset,same", LSE_BACKWARD_CASES)
def test_lse_backward_matches_float64_and_torch(kernels, tau, na, nc, p, offset, same):
    za, zc = _lse_inputs(na, nc, p, same)
    scale = 1.0 / tau
    g = torch.Generator().manual_seed(na)
    w = torch.rand(na, generator=g).to(DEVICE)
    w[0] = 0.0  # an anchor without positives
    lse, _ = lse_float64(za, zc, offset, scale)
    lse = lse.float()
    for n_grad_cols in sorted({nc, na if na <= nc else nc, 0}):
        dza, dzc = kernels.lse_backward(za, zc, lse, w, offset, scale, n_grad_cols)
        want_a, want_c = lse_backward_float64(za, zc, lse, w, offset, scale, n_grad_cols)
        torch_a, torch_c = TORCH.lse_backward(za, zc, lse, w, offset, scale, n_grad_cols)
        assert dza.shape == za.shape and dzc.shape == (n_grad_cols, p)
        # exp(scale * s - lse) turns float32 score errors (~1e-7) into ~1e-7 * scale
        tol = 2e-7 * scale + 2e-6
        assert rel_err(dza, want_a) < tol and rel_err(dza, torch_a) < tol
        if n_grad_cols:
            assert rel_err(dzc, want_c) < tol and rel_err(dzc, torch_c) < tol


def test_lse_backward_skips_columns_without_gradient(monkeypatch):
    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the column kernel ran although no column needs a gradient")

    monkeypatch.setattr(triton_kernels, "lse_backward_cols_kernel", NotLaunched())
    za, zc = _lse_inputs(37, 53, 24, False)
    lse = DEFAULT.lse_forward(za, zc, 0, 10.0)
    dza, dzc = DEFAULT.lse_backward(za, zc, lse, torch.ones(37, device=DEVICE), 0, 10.0, 0)
    assert dzc.shape == (0, 24)
    want_a, _ = lse_backward_float64(za, zc, lse, torch.ones(37), 0, 10.0, 0)
    assert rel_err(dza, want_a) < 1e-5


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_lse_backward_rounds_operands_to_the_input_dtype(dtype):
    za, zc = _lse_inputs(37, 53, 24, False)
    w = torch.rand(37, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    lse = DEFAULT.lse_forward(za, zc, 0, 10.0, dot_dtype=dtype)
    dza, dzc = DEFAULT.lse_backward(za, zc, lse, w, 0, 10.0, 53, dot_dtype=dtype)
    want_a, want_c = lse_backward_float64(za, zc, lse, w, 0, 10.0, 53)
    # P tiles and features rounded to bf16/fp16: errors of a few units of their precision
    eps = torch.finfo(dtype).eps
    assert 0 < rel_err(dza, want_a) < 8 * eps and 0 < rel_err(dzc, want_c) < 8 * eps


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_lse_backward_small_weights_and_probabilities_keep_their_precision(dtype):
    """Token scale: weights ~ 1 / (number of anchors), probabilities ~ 1 / (number of columns).

    Products of the two fall below fp16's smallest normal (6e-5) or flush to zero; the kernels
    keep the weights out of the rounded tiles and scale fp16 probability tiles by 2^12.
    """
    za, zc = _lse_inputs(37, 300, 24, False)
    g = torch.Generator().manual_seed(4)
    w = ((torch.rand(37, generator=g) - 0.3) * 1e-6).to(DEVICE)  # mixed signs, tiny
    lse = DEFAULT.lse_forward(za, zc, 0, 10.0, dot_dtype=dtype)
    dza, dzc = DEFAULT.lse_backward(za, zc, lse, w, 0, 10.0, 300, dot_dtype=dtype)
    want_a, want_c = lse_backward_float64(za, zc, lse, w, 0, 10.0, 300)
    eps = torch.finfo(dtype).eps
    assert rel_err(dza, want_a) < 8 * eps and rel_err(dzc, want_c) < 8 * eps


def test_noncontiguous_similarity_inputs():
    za, zc = _lse_inputs(37, 53, 24, False)
    za_nc, zc_nc = za.T.contiguous().T, zc.T.contiguous().T
    assert not za_nc.is_contiguous()
    assert torch.equal(DEFAULT.lse_forward(za_nc, zc_nc, 0, 10.0), DEFAULT.lse_forward(za, zc, 0, 10.0))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    za = torch.zeros(4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        DEFAULT.lse_forward(za, za, 0, 10.0)
    with pytest.raises(ValueError, match="n_grad_cols"):
        monkeypatch.setattr(triton_ops, "INTERPRET", True)
        DEFAULT.lse_backward(za.to(DEVICE), za.to(DEVICE), torch.zeros(4, device=DEVICE),
                             torch.zeros(4, device=DEVICE), 0, 10.0, 5)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_block_p"):
        TritonKernels(max_block_p=24)


# --------------------------------------------------------------------------- end to end


def _problem(dtype, nf, nr, d, p, with_weight, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(nf, d, generator=g).to(DEVICE, dtype)
    retain = torch.randn(nr, d, generator=g).to(DEVICE, dtype) if nr else None
    weight = (torch.randn(p, d, generator=g) / math.sqrt(d)).to(DEVICE, dtype) if with_weight else None
    bias = (torch.randn(p, generator=g) / 4).to(DEVICE, dtype) if with_bias else None
    return forget, retain, weight, bias


def _loss_and_grads(fn, tensors, cast=None, **kwargs):
    """Loss and the gradients of every tensor input (None where an input is absent)."""
    leaves = [None if t is None else (t.to(cast) if cast else t).detach().requires_grad_(True)
              for t in tensors]
    loss = fn(*leaves, **kwargs)
    # a fixed random cotangent for reduction="none", so every anchor's term is checked
    cot = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    (loss * cot).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


E2E_CASES = [
    # (Nf, Nr, D, P, weight, bias, labels, reduction, tau)
    pytest.param(37, 16, 19, 24, True, True, "groups", "mean", 0.1, id="proj_bias_mean"),
    pytest.param(37, 16, 19, 40, True, False, None, "sum", 0.01, id="proj_sum_tau0.01"),
    pytest.param(37, 16, 24, 24, False, False, "groups", "none", 0.1, id="noproj_none"),
    pytest.param(2, 3, 19, 24, True, True, None, "mean", 0.1, id="nf2"),
    pytest.param(37, 0, 19, 40, True, True, "groups", "mean", 0.05, id="nr0"),
]


def _labels(kind, nf):
    if kind is None:
        return None
    labels = torch.arange(nf) % 4
    labels[-1] = 99  # a singleton: an anchor without a positive
    return labels.to(DEVICE)


@pytest.mark.parametrize("nf,nr,d,p,with_w,with_b,labels,reduction,tau", E2E_CASES)
def test_fused_loss_fp32_matches_reference(nf, nr, d, p, with_w, with_b, labels, reduction, tau):
    tensors = _problem(torch.float32, nf, nr, d, p, with_w, with_b, seed=nf + p)
    kw = dict(labels=_labels(labels, nf), temperature=tau, reduction=reduction)
    loss, grads = _loss_and_grads(
        lambda *t, **k: fused_clreg_loss(*t, backend="triton", **k), tensors, **kw)
    loss_ref, grads_ref = _loss_and_grads(clreg_loss_reference, tensors, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss_ref.shape
    assert rel_err(loss, loss_ref) < 1e-4
    for name, g, g_ref in zip(("forget", "retain", "weight", "bias"), grads, grads_ref):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert g.dtype == torch.float32
            assert rel_err(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("nf,nr,d,p,with_w,with_b,labels,reduction,tau",
                         [E2E_CASES[0], E2E_CASES[2], E2E_CASES[3]])
def test_fused_loss_low_precision_flash_attention_rule(dtype, nf, nr, d, p, with_w, with_b,
                                                       labels, reduction, tau):
    """Fused error vs float64 <= 2 x (plain PyTorch error in the same dtype) + tiny atol.

    The atol is 1/20 of the dtype's rounding unit at the value's magnitude: a scalar loss can
    come out of the plain low-precision code with a lucky near-zero error, and a fused result
    that is closer to float64 than that is not a defect.
    """
    tensors = _problem(dtype, nf, nr, d, p, with_w, with_b, seed=7 * nf + p)
    lab = _labels(labels, nf)
    args = dict(labels=lab, temperature=tau, reduction=reduction)

    def impl(compute_dtype):
        return lambda *t, **k: _reference_impl(*t, k["labels"], k["temperature"], k["reduction"],
                                               compute_dtype=compute_dtype)

    loss, grads = _loss_and_grads(lambda *t, **k: fused_clreg_loss(*t, backend="triton", **k),
                                  tensors, **args)
    gold, gold_grads = _loss_and_grads(impl(torch.float64), tensors, cast=torch.float64, **args)
    plain, plain_grads = _loss_and_grads(impl(dtype), tensors, **args)
    assert loss.dtype == torch.float32

    def check(name, got, want, base):
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        atol = 0.05 * torch.finfo(dtype).eps * want.abs().max().item()
        assert err <= 2 * base_err + atol, f"{name}: fused {err:.3g} vs plain {base_err:.3g}"

    check("loss", loss, gold, plain)
    for name, g, g_gold, g_plain in zip(("forget", "retain", "weight", "bias"), grads,
                                        gold_grads, plain_grads):
        if g is not None:
            assert g.dtype == dtype, name
            check(name, g, g_gold, g_plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_loss_nf2_nr0_is_zero(dtype):
    """Two forget rows, no retain rows: each anchor's only other row is its positive, so the
    loss is lse - s/tau = 0 exactly and every gradient is 0; float32 leaves ~1e-7 * scale.

    For bf16/fp16 the positive term must use the operands the kernels' scores use (rounded to
    the input dtype); with float32 z there it misses the lse by a bf16 rounding unit (~1e-3).
    """
    forget, _, weight, bias = _problem(dtype, 2, 0, 19, 24, True, True, seed=3)
    loss, grads = _loss_and_grads(lambda *t, **k: fused_clreg_loss(*t, backend="triton", **k),
                                  (forget, None, weight, bias), temperature=0.1)
    tol = 1e-6 * 10.0  # scale = 1 / tau = 10
    assert abs(loss.item()) < tol
    for name, g in zip(("forget", "weight", "bias"), (grads[0], grads[2], grads[3])):
        assert g.dtype == dtype and g.abs().max().item() < tol, name
    loss_ref = clreg_loss_reference(forget.float(), None, weight.float(), bias.float())
    assert abs(loss_ref.item()) < 1e-5


def test_detached_retain_skips_retain_columns(monkeypatch):
    calls = []
    original = TritonKernels.lse_backward

    def spy(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype=torch.float32):
        calls.append((za.shape[0], zc.shape[0], n_grad_cols))
        return original(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype)

    monkeypatch.setattr(TritonKernels, "lse_backward", spy)
    forget, retain, _, _ = _problem(torch.float32, 37, 16, 24, 24, False, False, seed=5)
    forget.requires_grad_(True)
    loss = fused_clreg_loss(forget, retain.detach(), backend="triton")
    loss.backward()
    assert calls == [(37, 53, 37)]
    f_ref = forget.detach().clone().requires_grad_(True)
    clreg_loss_reference(f_ref, retain).backward()
    assert rel_err(forget.grad, f_ref.grad) < 1e-4


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int64_row_offsets_on_gpu():
    """Rows past 2^31 / P elements: row * stride overflows int32 unless offsets are int64."""
    p = 128
    n = (1 << 31) // p + 1000
    za = torch.zeros(n, p, device="cuda")
    za[:, 0] = 1.0
    za[-3:] = unit_rows(3, p, seed=0)
    zc = unit_rows(40, p, seed=1)
    lse = DEFAULT.lse_forward(za, zc, 0, 10.0)
    want, _ = lse_float64(za[-3:], zc, n - 3, 10.0)
    assert (lse[-3:].double() - want).abs().max().item() < 2e-5
    dza, dzc = DEFAULT.lse_backward(zc, za, torch.zeros(40, device="cuda") + 30.0,
                                    torch.ones(40, device="cuda"), 0, 10.0, n)
    want_c = torch.exp((za[-3:].double() @ zc.double().T) * 10.0 - 30.0) @ zc.double() * 10.0
    assert rel_err(dzc[-3:], want_c) < 1e-5


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere():
    """Compile every launched variant for sm_90 and sm_80 with the GPU toolchain (no GPU needed):
    catches what the interpreter cannot (dot layouts and dtypes, shared memory limits, register
    spills). The default configurations at P = 200 (the widest tiles) and 24, every input kind."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "clreg_fast.backends.triton.compile_check", "--arch", "90", "80",
         "--p", "200", "24", "--dtype", "fp32", "bf16", "fp16", "tf32"],
        capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok  ") == 2 * 2 * 4 * 7  # archs x P x kinds x variants


@pytest.mark.parametrize("kernels", [TORCH, DEFAULT], ids=["torch", "triton"])
def test_lse_backward_without_anchor_gradient(kernels):
    """need_dza=False returns no anchor gradient and the same column gradient."""
    za, zc = unit_rows(21, 24, seed=3), unit_rows(30, 24, seed=4)
    w = torch.linspace(-1, 2, 21, device=DEVICE)
    lse = kernels.lse_forward(za, zc, 4, 10.0)
    dza, dzc = kernels.lse_backward(za, zc, lse, w, 4, 10.0, 17)
    none, dzc_only = kernels.lse_backward(za, zc, lse, w, 4, 10.0, 17, need_dza=False)
    assert dza is not None and none is None
    torch.testing.assert_close(dzc_only, dzc, rtol=0, atol=0)

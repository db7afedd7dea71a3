"""Every fast backend against the reference: loss and every gradient, odd sizes, every dtype.

On a machine without a GPU the ``triton`` backend runs in the Triton interpreter (conftest sets
TRITON_INTERPRET=1) and ``cuda`` is skipped.
"""
import pytest
import torch

from clreg_fast import available_backends, clreg_loss_reference, fused_clreg_loss
from clreg_fast.backends import resolve_backend
from tests._cases import Case, abs_err, loss_and_grads, make_inputs, reference_in, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_BACKENDS = ["torch", "triton", "cuda"]


def backend_param(name):
    marks = [pytest.mark.gpu] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[backend_param(b) for b in FAST_BACKENDS])
def backend(request):
    name = request.param
    if name not in available_backends():
        pytest.skip(f"backend {name!r} is not available here (available: {available_backends()})")
    return name


def fused(backend):
    def fn(*args, **kw):
        return fused_clreg_loss(*args, backend=backend, **kw)

    return fn


# Small enough for the Triton interpreter; none of the sizes is a multiple of a block size.
CASES = [
    Case(2, 3, 8, None),                                   # smallest legal forget batch
    Case(37, 53, 19, 24, n_labels=5),                      # odd everything, projection + bias
    Case(23, 5, 40, None, n_labels=3, retain_grad=False),  # retain detached, no projection
    Case(19, 30, 17, 20, bias=False, temperature=0.01),    # small tau: running-max path
    Case(40, 0, 12, 33, n_labels=2),                       # Nr = 0 with projection, P odd
    Case(17, 66, 9, 16, retain_grad=False, temperature=0.5),  # detached retain, weight trained
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_reference(backend, case, reduction):
    tensors, labels = make_inputs(case, torch.float32, DEVICE)
    ref_loss, ref_grads = loss_and_grads(clreg_loss_reference, tensors, labels, case, reduction)
    loss, grads = loss_and_grads(fused(backend), tensors, labels, case, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    # the loss is a difference of logits of size up to 1/tau: judge it on that scale
    assert rel_err(loss, ref_loss, floor=1 / case.temperature) <= 1e-4
    for name, g, rg in zip(("forget", "retain", "weight", "bias"), grads, ref_grads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert g.dtype == torch.float32 and g.shape == rg.shape, name
            assert rel_err(g, rg) <= 1e-4, name


LOW_CASES = [Case(37, 53, 19, 24, n_labels=5), Case(21, 11, 33, None, retain_grad=False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOW_CASES, ids=str)
def test_low_precision_flash_attention_rule(backend, dtype, case):
    """Fused error against float64 <= 2x the error plain PyTorch makes in the same dtype.

    The float64 gold uses the same rounded inputs, so input rounding is nobody's error.
    """
    tensors, labels = make_inputs(case, dtype, DEVICE)
    gold_inputs = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                   for t in tensors]
    gold_loss, gold_grads = loss_and_grads(reference_in(torch.float64), gold_inputs, labels, case,
                                           "mean")
    naive_loss, naive_grads = loss_and_grads(reference_in(dtype), tensors, labels, case, "mean")
    loss, grads = loss_and_grads(fused(backend), tensors, labels, case, "mean")
    assert loss.dtype == torch.float32
    assert abs_err(loss, gold_loss) <= 2 * abs_err(naive_loss, gold_loss) + 1e-5
    for name, g, ng, gg in zip(("forget", "retain", "weight", "bias"), grads, naive_grads,
                               gold_grads):
        if gg is None:
            continue
        assert g.dtype == dtype, name
        assert abs_err(g, gg) <= 2 * abs_err(ng, gg) + 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_projection", [False, True])
def test_two_forget_rows_no_retain_is_exactly_zero(backend, with_projection, dtype):
    """Nf = 2, Nr = 0: each anchor's only other row is its positive, so loss and grads are 0.

    Rounding noise is judged against the size of the terms that cancel (1/tau), not the result.
    For bf16/fp16 this holds only if both terms see the same (rounded) similarity.
    """
    case = Case(2, 0, 8, 5 if with_projection else None)
    tensors, labels = make_inputs(case, dtype, DEVICE)
    loss, grads = loss_and_grads(fused(backend), tensors, labels, case, "sum")
    assert abs(float(loss)) <= 1e-5 / case.temperature
    for g in grads:
        if g is not None and g.numel():
            assert float(g.abs().max()) <= 1e-5 / case.temperature


def test_torch_backend_gradcheck_float64():
    """The hand-written backward against finite differences (float64, custom autograd)."""
    case = Case(7, 5, 6, 4, n_labels=3)
    (forget, retain, weight, bias), labels = make_inputs(case, torch.float64)

    def loss(f, r, w, b):
        return fused_clreg_loss(f, r, w, b, labels=labels, temperature=0.2, reduction="mean",
                                backend="torch")

    assert torch.autograd.gradcheck(loss, (forget, retain, weight, bias))


def test_zero_rows_give_finite_loss_and_grads(backend):
    case = Case(9, 7, 10, None)
    (forget, retain, _, _), _ = make_inputs(case, torch.float32, DEVICE)
    with torch.no_grad():
        forget[3] = 0
        retain[2] = 0
    loss, grads = loss_and_grads(fused(backend), [forget, retain, None, None], None, case, "mean")
    ref_loss, ref_grads = loss_and_grads(clreg_loss_reference, [forget, retain, None, None], None,
                                         case, "mean")
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref_loss) <= 1e-4
    for g, rg in zip(grads[:2], ref_grads[:2]):
        assert torch.isfinite(g).all()
        assert rel_err(g, rg) <= 1e-4


def test_detached_retain_skips_retain_columns(monkeypatch):
    """With retain detached and no projection, the kernels are asked for forget columns only."""
    kernels = resolve_backend("torch", torch.empty(1))
    seen = []
    original = kernels.lse_backward

    def spy(za, zc, lse, w, self_offset, scale, n_grad_cols, **kw):
        seen.append((zc.shape[0], n_grad_cols))
        return original(za, zc, lse, w, self_offset, scale, n_grad_cols, **kw)

    monkeypatch.setattr(kernels, "lse_backward", spy)
    forget = torch.randn(6, 5, requires_grad=True)
    retain = torch.randn(8, 5)
    fused_clreg_loss(forget, retain, backend="torch").backward()
    assert seen == [(14, 6)]
    # a projection trained through the retain rows needs their columns again
    weight = torch.randn(3, 5, requires_grad=True)
    fused_clreg_loss(forget, retain, weight, backend="torch").backward()
    assert seen[-1] == (14, 14)


def test_auto_backend_on_cpu_is_torch():
    assert resolve_backend("auto", torch.empty(1)).name == "torch"


def test_float64_inputs_return_float64_on_torch_backend():
    forget = torch.randn(5, 4, dtype=torch.float64)
    assert fused_clreg_loss(forget, None, backend="torch").dtype == torch.float64


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_matches_functional(reduction):
    from clreg_fast import CLRegLoss

    torch.manual_seed(0)
    module = CLRegLoss(in_features=12, out_features=7, temperature=0.2, reduction=reduction,
                       backend="torch")
    forget, retain = torch.randn(9, 12), torch.randn(4, 12)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
    got = module(forget, retain, labels=labels)
    expected = clreg_loss_reference(forget, retain, module.projection.weight,
                                    module.projection.bias, labels=labels, temperature=0.2,
                                    reduction=reduction)
    assert rel_err(got, expected) <= 1e-5
    got.sum().backward()
    assert module.projection.weight.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the triton kernels run natively")
def test_triton_kernels_are_exercised_without_gpu():
    """CI has no GPU: the triton tests above must run in the interpreter, not be skipped."""
    assert "triton" in available_backends()


@pytest.mark.parametrize("row0,offset", [(0, 0), (3, 0), (0, 4), (2, -5), (0, 30), (0, -9)])
def test_torch_backend_masks_exactly_the_left_out_pairs(row0, offset):
    """(row i, column row0 + i + offset) and nothing else, also when the pair lies outside."""
    from clreg_fast.backends.torch_chunked.ops import _mask_self

    block = torch.zeros(6, 9)
    _mask_self(block, row0, offset, 1.0)
    rows = torch.arange(6)[:, None]
    cols = torch.arange(9)[None, :]
    assert torch.equal(block, (cols == rows + row0 + offset).float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_primitives_do_not_sync_with_the_host():
    kernels = resolve_backend("torch", torch.empty(1, device="cuda"))
    za = torch.nn.functional.normalize(torch.randn(37, 24, device="cuda"), dim=1)
    zc = torch.cat([za, torch.nn.functional.normalize(torch.randn(20, 24, device="cuda"), dim=1)])
    w = torch.rand(37, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lse = kernels.lse_forward(za, zc, 0, 10.0)
        kernels.lse_backward(za, zc, lse, w, 0, 10.0, zc.shape[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_non_finite_cotangent_on_anchor_without_positive_stays_out(backend):
    """reduction='none': the loss of an anchor without a positive is the constant 0, so a NaN
    cotangent there must not reach any gradient (the reference does the same)."""
    forget = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    retain = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 2], device=DEVICE)  # row 2 has no positive
    cot = torch.ones(5, device=DEVICE)
    cot[2] = float("nan")
    for fn in (fused(backend), clreg_loss_reference):
        loss = fn(forget, retain, labels=labels, reduction="none")
        grads = torch.autograd.grad(loss, [forget, retain], cot)
        assert all(torch.isfinite(g).all() for g in grads), fn


AUTOCAST_DTYPE = torch.float16 if DEVICE == "cuda" else torch.bfloat16


@pytest.mark.parametrize("case", [Case(2, 0, 8, 5), Case(37, 53, 19, 24, n_labels=5)], ids=str)
def test_autocast_leaves_the_loss_as_without_it(backend, case):
    """Trainers run the loss under autocast (``bf16=True``): the inputs' dtypes, not autocast,
    choose the math, so every backend gives what it gives outside autocast (and Nf = 2, Nr = 0
    stays 0: autocast rounding only the similarity GEMMs would break the cancellation)."""
    tensors, labels = make_inputs(case, torch.float32, DEVICE)
    plain_loss, plain_grads = loss_and_grads(fused(backend), tensors, labels, case, "mean")
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
        loss, grads = loss_and_grads(fused(backend), tensors, labels, case, "mean")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for g, pg in zip(grads, plain_grads):
        assert (g is None) == (pg is None)
        if g is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, pg, rtol=1e-5, atol=1e-6)

"""Triton launchers: the device guard, column splits and TF32 mode (issues 16 and 18).

Runs in the triton interpreter without a GPU (tests/conftest.py). Column splits are forced with
``col_splits=`` (the automatic rule gives 1 in the interpreter) at few anchors against many
columns; every result is checked against float64 math or ``clreg_loss_reference``.
"""
import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")

from clreg_fast import clreg_loss_reference, fused_clreg_loss  # noqa: E402
from clreg_fast.backends import available_backends  # noqa: E402

if "triton" not in available_backends():
    pytest.skip("the triton backend is not usable here (no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from clreg_fast.backends.triton import TritonKernels  # noqa: E402
from clreg_fast.backends.triton import ops as triton_ops  # noqa: E402
from clreg_fast.backends.triton.tuning import KernelConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT = TritonKernels()
TILED = TritonKernels(max_block_p=16)


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def unit_rows(n, p, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=1)
    return z.float().to(device)


def lse_float64(za, zc, self_offset, scale):
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


# --------------------------------------------------------------------------- device guard


class _GuardSpy:
    """Stands in for ``ops._on_device`` and ``ops._launch``: records each launch's device."""

    def __init__(self):
        self.current = None
        self.launches = []

    def on_device(self, t):
        @contextlib.contextmanager
        def guard():
            previous, self.current = self.current, t.device
            try:
                yield
            finally:
                self.current = previous
        return guard()

    def launch(self, kernel):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        self.launches.append((name, self.current))
        return kernel


def test_every_launch_enters_the_tensors_device(monkeypatch):
    spy = _GuardSpy()
    monkeypatch.setattr(triton_ops, "_on_device", spy.on_device)
    monkeypatch.setattr(triton_ops, "_launch", spy.launch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 19, generator=g).to(DEVICE)
    weight = torch.randn(24, 19, generator=g).to(DEVICE)
    z, norm = DEFAULT.project_normalize(x, weight, None)
    DEFAULT.project_normalize(x, None, None)
    TritonKernels(max_block_p=16).project_normalize(x, weight, None)  # + normalize pass
    DEFAULT.normalize_backward(torch.ones_like(z), z, norm)
    lse = DEFAULT.lse_forward(z, z, 0, 10.0)
    DEFAULT.lse_forward(z, z, 0, 10.0, col_splits=2)
    DEFAULT.lse_backward(z, z, lse, torch.ones(21, device=DEVICE), 0, 10.0, 21, col_splits=2)
    names = [name for name, _ in spy.launches]
    assert names == ["project_kernel", "normalize_kernel", "project_kernel", "normalize_kernel",
                     "normalize_backward_kernel", "lse_forward_kernel", "lse_forward_kernel",
                     "lse_backward_rows_kernel", "lse_backward_cols_kernel"]
    assert all(device == z.device for _, device in spy.launches), spy.launches


def test_on_device_is_a_cuda_device_guard_for_cuda_tensors(monkeypatch):
    entered = []

    class FakeGuard:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with triton_ops._on_device(on_gpu1):
        pass
    assert entered == [torch.device("cuda", 1)]
    with triton_ops._on_device(torch.zeros(1)):  # CPU tensors (interpreter): no guard
        pass
    assert len(entered) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launches must follow the tensors."""
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(2)
    forget = torch.randn(67, 48, generator=g).to("cuda:1").requires_grad_(True)
    retain = torch.randn(45, 48, generator=g).to("cuda:1").requires_grad_(True)
    weight = (torch.randn(40, 48, generator=g) / 7).to("cuda:1").requires_grad_(True)
    loss = fused_clreg_loss(forget, retain, weight, backend="triton")
    loss.backward()
    assert torch.cuda.current_device() == 0 and loss.device == torch.device("cuda:1")
    leaves = [t.detach().clone().requires_grad_(True) for t in (forget, retain, weight)]
    ref = clreg_loss_reference(*leaves)
    ref.backward()
    # GPU exp/log are approximate: ~1e-6 relative, far inside 1e-4
    assert rel_err(loss, ref) < 1e-4
    for got, want in zip((forget, retain, weight), leaves):
        assert rel_err(got.grad, want.grad) < 1e-4


# --------------------------------------------------------------------------- column splits


SPLIT_CASES = [
    # (Na, Nc, P, self_offset, splits): few anchors against many columns
    pytest.param(5, 301, 24, 0, 3, id="na5_splits3"),
    pytest.param(5, 301, 24, 250, 7, id="self_column_in_a_late_split"),
    pytest.param(3, 64, 40, -1, 100, id="more_splits_than_tiles"),
    pytest.param(19, 150, 24, 0, 2, id="two_row_blocks"),
]


@pytest.mark.parametrize("kernels", [DEFAULT, TILED], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("tau", [0.1, 0.01], ids=["fixed_shift", "running_max"])
@pytest.mark.parametrize("na,nc,p,offset,splits", SPLIT_CASES)
def test_lse_forward_with_column_splits_matches_float64(kernels, tau, na, nc, p, offset, splits):
    za, zc = unit_rows(na, p, seed=na), unit_rows(nc, p, seed=nc)
    scale = 1.0 / tau
    got = kernels.lse_forward(za, zc, offset, scale, col_splits=splits)
    want, _ = lse_float64(za, zc, offset, scale)
    assert got.shape == (na,) and got.dtype == torch.float32
    assert (got.double().cpu() - want.cpu()).abs().max().item() < 2e-6 * scale
    one = kernels.lse_forward(za, zc, offset, scale, col_splits=1)
    assert (got - one).abs().max().item() < 2e-6 * scale


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0)
def test_split_without_a_valid_column_merges_to_the_other_splits():
    """A split whose only column is the anchor itself gives -inf; the merge ignores it, and an
    anchor with no valid column at all stays -inf."""
    za = unit_rows(2, 24, seed=1)
    zc = torch.cat([za[:1], unit_rows(16, 24, seed=2)])  # column 0 is anchor 0 itself
    cfg = KernelConfig(16, 16, 4, 1)
    got = DEFAULT.lse_forward(za, zc, 0, 10.0, config=cfg, col_splits=2)
    want, _ = lse_float64(za, zc, 0, 10.0)
    assert (got.double() - want.cpu()).abs().max().item() < 2e-5
    alone = DEFAULT.lse_forward(za, za[:1], 0, 10.0, col_splits=3)
    assert alone[0].item() == float("-inf")


@pytest.mark.parametrize("kernels", [DEFAULT, TILED], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("na,nc,p,offset,splits", SPLIT_CASES[:3])
def test_lse_backward_rows_with_column_splits_matches_float64(kernels, na, nc, p, offset, splits):
    za, zc = unit_rows(na, p, seed=na + 1), unit_rows(nc, p, seed=nc + 1)
    scale = 10.0
    w = torch.linspace(-0.5, 1.0, na, device=DEVICE)
    lse = lse_float64(za, zc, offset, scale)[0].float()
    dza, dzc = kernels.lse_backward(za, zc, lse, w, offset, scale, nc, col_splits=splits)
    want_a, want_c = lse_backward_float64(za, zc, lse, w, offset, scale, nc)
    tol = 2e-7 * scale + 2e-6
    assert rel_err(dza, want_a) < tol and rel_err(dzc, want_c) < tol
    dza1, _ = kernels.lse_backward(za, zc, lse, w, offset, scale, 0, col_splits=1)
    assert rel_err(dza, dza1) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_retain_grad", [True, False])
def test_fused_loss_with_column_splits_matches_reference(monkeypatch, dtype, with_retain_grad):
    """Every launch split 3 ways (or fewer where there are fewer column tiles)."""
    monkeypatch.setattr(triton_ops, "_auto_column_splits", lambda programs, tiles, device: 3)
    g = torch.Generator().manual_seed(11)
    forget = torch.randn(9, 19, generator=g).to(DEVICE, dtype)
    retain = torch.randn(90, 19, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(24, 19, generator=g) / 4).to(DEVICE, dtype)
    bias = (torch.randn(24, generator=g) / 4).to(DEVICE, dtype)
    labels = (torch.arange(9) % 3).to(DEVICE)
    leaves = [t.detach().clone().requires_grad_(True) for t in (forget, retain, weight, bias)]
    if not with_retain_grad:
        leaves[1].requires_grad_(False)
    loss = fused_clreg_loss(*leaves, labels=labels, backend="triton")
    loss.backward()
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = clreg_loss_reference(*ref_leaves, labels=labels)
    ref.backward()
    # bf16/fp16 operands: a few units of their rounding on the loss and the gradients
    tol = 1e-4 if dtype == torch.float32 else 30 * torch.finfo(dtype).eps
    assert rel_err(loss, ref) < tol
    for name, got, want in zip(("forget", "retain", "weight", "bias"), leaves, ref_leaves):
        if want.requires_grad:
            assert got.grad.dtype == dtype
            assert rel_err(got.grad, want.grad) < tol, name
        else:
            assert got.grad is None


def test_automatic_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    monkeypatch.setattr(triton_ops, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # 256 anchors in blocks of 64: 4 programs on 132 SMs -> 66 splits of >= 8 column tiles
    assert triton_ops._auto_column_splits(4, 2048, cuda) == 66
    assert triton_ops._auto_column_splits(4, 100, cuda) == 12      # capped by 8 tiles a split
    assert triton_ops._auto_column_splits(132, 10 ** 6, cuda) == 1  # the anchors fill the GPU
    assert triton_ops._auto_column_splits(67, 10 ** 6, cuda) == 1   # more than half of it
    assert triton_ops._auto_column_splits(66, 10 ** 6, cuda) == 4
    assert triton_ops._auto_column_splits(1, 10 ** 6, cuda) == triton_ops.MAX_COL_SPLITS
    assert triton_ops._auto_column_splits(4, 2048, torch.device("cpu")) == 1
    # the forced count never leaves a split without a column tile
    assert triton_ops._column_splits(100, 1, 64, 16, cuda) == (4, 16)
    assert triton_ops._column_splits(3, 1, 64, 16, cuda) == (2, 32)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_col_splits_and_configs_are_refused(bad):
    za = unit_rows(4, 16, seed=0)
    with pytest.raises(ValueError, match="col_splits"):
        DEFAULT.lse_forward(za, za, 0, 10.0, col_splits=bad)
    with pytest.raises(TypeError, match="config"):
        DEFAULT.lse_forward(za, za, 0, 10.0, config=(16, 16, 4, 1))
    with pytest.raises(ValueError, match="rows_config.block_m"):
        DEFAULT.lse_backward(za, za, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
                             0, 10.0, 0, rows_config=KernelConfig(24, 16, 4, 1))


# --------------------------------------------------------------------------- TF32 mode


def test_tf32_mode_is_off_by_default_and_follows_pytorch(monkeypatch):
    assert torch.get_float32_matmul_precision() == "highest"
    assert not TritonKernels()._tf32()
    assert TritonKernels(allow_tf32=True)._tf32()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert TritonKernels()._tf32() and not TritonKernels(allow_tf32=False)._tf32()
    with pytest.raises(TypeError, match="allow_tf32"):
        TritonKernels(allow_tf32="yes")


TF32_EPS = 2.0 ** -10  # TF32 keeps 10 mantissa bits


@pytest.mark.parametrize("kernels", [TritonKernels(allow_tf32=True),
                                     TritonKernels(allow_tf32=True, max_block_p=16)],
                         ids=["one_tile", "tiled"])
def test_tf32_similarity_kernels_within_tf32_error(kernels):
    za, zc = unit_rows(37, 40, seed=5), unit_rows(53, 40, seed=6)
    scale = 10.0
    w = torch.rand(37, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    lse = kernels.lse_forward(za, zc, 0, scale)
    want, _ = lse_float64(za, zc, 0, scale)
    err = (lse.double().cpu() - want.cpu()).abs().max().item()
    # scores of unit rows carry ~TF32_EPS, times the scale; and the rounding really happened
    assert 1e-5 < err < 4 * TF32_EPS * scale
    dza, dzc = kernels.lse_backward(za, zc, want.float(), w, 0, scale, 53)
    want_a, want_c = lse_backward_float64(za, zc, want.float(), w, 0, scale, 53)
    bar = 8 * TF32_EPS * scale
    assert rel_err(dza, want_a) < bar and rel_err(dzc, want_c) < bar
    assert rel_err(dza, want_a) > 1e-6  # not float32 products


def test_fused_loss_tf32_mode_within_tf32_error(monkeypatch):
    import clreg_fast.backends as registry

    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert registry._triton_kernels()[0]._tf32()
    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(37, 19, generator=g), torch.randn(16, 19, generator=g),
               torch.randn(24, 19, generator=g) / 4, torch.randn(24, generator=g) / 4]
    leaves = [t.to(DEVICE).detach().clone().requires_grad_(True) for t in tensors]
    refs = [t.detach().double().requires_grad_(True) for t in tensors]
    loss = fused_clreg_loss(*leaves, backend="triton")
    loss.backward()
    ref = clreg_loss_reference(*refs)
    ref.backward()
    bar = 8 * TF32_EPS * 10.0  # scale 1 / tau = 10
    assert rel_err(loss, ref) < bar
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == torch.float32 and rel_err(got.grad, want.grad) < bar
    assert rel_err(loss, ref) > 1e-7 or any(rel_err(a.grad, b.grad) > 1e-6
                                            for a, b in zip(leaves, refs))

"""The CUDA kernels' loop structure, emulated in float64 on CPU (tests/_cuda_emulation.py).

No GPU runs here: these tests check what a GPU run cannot be trusted to reveal alone -- the
split policy (csrc/splits.h) and, for every kernel, the tile order, split ranges, masks, the
left-out pair at any offset, lane ownership, merges, the workspace slices and the glue's
reduction -- against dense float64 math. The tensor-core sweep is emulated at fragment level
(swizzled shared memory, ldmatrix, mma.m16n8k16 layouts of the PTX ISA). What the hardware
adds (rounding to bf16/fp16, float32 accumulation, approximate exp) is for the GPU tests in
tests/test_cuda_backend.py.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from clreg_fast.backends.cuda import splits
from tests import _cuda_emulation as emu

# Machines the split policy must serve: A100 (108 SMs), H100/H200 (132), a small GPU, one SM.
GPUS = [(132, 6), (108, 4), (16, 2), (1, 1)]


def _unit_rows(n, p, seed, cluster=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    if cluster and n > 1:
        x[: n // 2] += 2.0 * x[:1]  # large similarities: the hard case for exp
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Split policy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_blocks", [1, 3, 4, 200, 5000])
@pytest.mark.parametrize("n_swept", [1, 2, 7, 64, 1024, 100_000])
@pytest.mark.parametrize("slice_elements", [0, 256, 64 * 128, 4096 * 256, 1 << 26])
@pytest.mark.parametrize("sms, per_sm", GPUS)
def test_split_policy_invariants(n_blocks, n_swept, slice_elements, sms, per_sm):
    count, per = splits.choose_splits(n_blocks, n_swept, slice_elements, sms, per_sm)
    assert count >= 1 and per >= 1
    # Every swept tile is in exactly one split and no split is empty.
    assert (count - 1) * per < n_swept <= count * per
    assert count <= splits.MAX_SPLITS_GRID
    # Only the extra splits are capped by the workspace budget.
    if slice_elements:
        assert (count - 1) * slice_elements <= splits.MAX_EXTRA_WORKSPACE_ELEMENTS
    # Aim: enough blocks to fill the GPU, unless the sweep or the budget runs out first.
    budget = 1 + splits.MAX_EXTRA_WORKSPACE_ELEMENTS // slice_elements if slice_elements else n_swept
    cap = min(n_swept, budget, splits.MAX_SPLITS_GRID)
    aim = min(-(-(sms * per_sm) // n_blocks), cap)
    assert aim / 2 <= count <= cap
    if aim < cap / 2:  # room to round the split size down: the aim is met
        assert count >= aim


def test_few_anchors_against_many_columns_fill_an_h100():
    """Issue 18.2: 256 anchors against 64K columns used to get 4 x 32 = 128 blocks."""
    sms, per_sm = 132, 6
    count, per = splits.forward_splits(256, 65536, sms, per_sm)
    assert count * 4 >= sms * per_sm and count > 32
    count, per = splits.backward_splits(256, 65536, 128, sms, per_sm)
    assert count * 4 >= sms * per_sm and count > 32
    # The column pass of the same problem has plenty of blocks: no split.
    assert splits.backward_splits(65536, 256, 128, sms, per_sm)[0] == 1


def test_backward_splits_respect_the_workspace_budget():
    # 1e6 gradient columns x 128 features: one slice alone is 512 MB, no extra split fits.
    assert splits.backward_splits(10**6, 64, 128, 132, 6) == (1, 1)
    # 2048 owned rows x 1024 features (8 MiB a slice) against 1e6 swept rows: the GPU wants 25
    # splits, the 64 MiB budget allows 1 + 8.
    count, per = splits.backward_splits(2048, 10**6, 1024, 132, 6)
    assert count == 9 and (count - 1) * per < emu._ceil_div(10**6, 64) <= count * per


def test_compiled_split_policy_matches_the_mirror():
    try:
        ext = importlib.import_module("clreg_fast._C")
    except ImportError as exc:
        pytest.skip(f"clreg_fast._C is not built here ({exc}); scripts/check_cuda_build.sh "
                    "compares the two after its build")
    rng = np.random.default_rng(0)
    for _ in range(2000):
        args = [int(rng.integers(0, 10 ** rng.integers(1, 7))) for _ in range(3)]
        args += [int(rng.integers(1, 200)), int(rng.integers(1, 33))]
        assert tuple(ext.choose_splits(*args)) == splits.choose_splits(*args), args


# --------------------------------------------------------------------------------------------
# Kernels against dense float64 math
# --------------------------------------------------------------------------------------------

SHAPES = [  # (Na, Nc, P, self_offset)
    (2, 2, 8, 0),          # smallest loss
    (37, 101, 19, 0),      # odd everything
    (65, 130, 129, 0),     # one past whole tiles in every dimension
    (30, 75, 40, 45),      # anchors are the last rows of the columns (distributed slice)
    (30, 75, 40, -7),      # negative offset
    (20, 50, 16, 1000),    # offset past the end: nothing left out
    (64, 700, 48, 0),      # many column tiles: split sweeps
]


def _inputs(na, nc, p, off, seed):
    za = _unit_rows(na, p, seed)
    zc = _unit_rows(nc, p, seed + 1)
    if off == 0:
        zc[: min(na, nc)] = za[: min(na, nc)]  # the anchors are the first columns
    return za, zc


@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])  # fixed shift and running maximum
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])  # many splits and one
def test_legacy_forward_emulation(na, nc, p, off, tau, sms, per_sm):
    za, zc = _inputs(na, nc, p, off, seed=na + p)
    scale = 1 / tau
    got = emu.legacy_lse_forward(za, zc, off, scale, scale <= 40, sms, per_sm)
    np.testing.assert_allclose(got, emu.dense_lse_forward(za, zc, off, scale), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])
def test_sweep_forward_emulation(na, nc, p, off, tau, sms, per_sm):
    if emu.sweep_tc_dim(p) == 0:
        pytest.skip("the sweep kernels take P <= 256")
    za, zc = _inputs(na, nc, p, off, seed=na + p)
    scale = 1 / tau
    got = emu.tc_lse_forward(za, zc, off, scale, scale <= 40, sms, per_sm)
    np.testing.assert_allclose(got, emu.dense_lse_forward(za, zc, off, scale), rtol=1e-12,
                               atol=1e-12)


def _backward_case(na, nc, p, off, grad_cols, seed):
    za, zc = _inputs(na, nc, p, off, seed)
    scale = 10.0
    lse = emu.dense_lse_forward(za, zc, off, scale)
    rng = np.random.default_rng(seed)
    w = (rng.random(na) - 0.3) / na  # mixed signs
    w[::5] = 0.0                     # anchors without positives
    n_grad = {"all": nc, "anchors": min(na, nc), "none": 0, "odd": max(1, nc // 3)}[grad_cols]
    return za, zc, lse, w, scale, n_grad


def _check_backward(got, want):
    for g, x in zip(got, want):
        assert g.shape == x.shape
        if x.size:
            np.testing.assert_allclose(g, x, rtol=1e-10, atol=1e-13 * np.abs(x).max())


@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "none", "odd"])
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])
def test_legacy_backward_emulation(na, nc, p, off, grad_cols, sms, per_sm):
    za, zc, lse, w, scale, n_grad = _backward_case(na, nc, p, off, grad_cols, seed=2 * na + p)
    want = emu.dense_lse_backward(za, zc, lse, w, off, scale, n_grad)
    for fp16 in (False, True):  # the 2^12 scale of fp16 probability tiles, undone by the glue
        got = emu.legacy_lse_backward(za, zc, lse, w, off, scale, n_grad, fp16, sms, per_sm)
        _check_backward(got, want)


@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "none", "odd"])
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])
def test_sweep_backward_emulation(na, nc, p, off, grad_cols, sms, per_sm):
    if emu.sweep_tc_dim(p) == 0:
        pytest.skip("the sweep kernels take P <= 256")
    za, zc, lse, w, scale, n_grad = _backward_case(na, nc, p, off, grad_cols, seed=2 * na + p)
    want = emu.dense_lse_backward(za, zc, lse, w, off, scale, n_grad)
    got = emu.tc_lse_backward(za, zc, lse, w, off, scale, n_grad, grad_cols == "odd", sms, per_sm)
    _check_backward(got, want)


# Variants the shapes above miss: D = 128 (3-stage ring, 8 feature blocks of 16), the left-out
# pair one tile away or at a tile's last column, offsets far outside and past 2^32.
SWEEP_SHAPES = [  # (Na, Nc, P, self_offset)
    (70, 200, 100, 3),       # D = 128, ld_out = 128
    (33, 129, 128, -5),      # D = 128 exactly, a one-row last column tile
    (30, 200, 40, 64),       # the pair is one whole tile to the right
    (100, 120, 72, -63),     # D = 128, the pair at column 0 of a tile for row 63
    (40, 90, 24, -1000),     # far negative: nothing left out
    (20, 50, 16, 2 ** 40),   # 64-bit offset: nothing left out
]


@pytest.mark.parametrize("na, nc, p, off", SWEEP_SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_sweep_forward_emulation_more_variants(na, nc, p, off, tau):
    za, zc = _inputs(na, nc, p, off, seed=na + p)
    scale = 1 / tau
    for sms, per_sm in [(132, 6), (1, 1)]:
        got = emu.tc_lse_forward(za, zc, off, scale, scale <= 40, sms, per_sm)
        np.testing.assert_allclose(got, emu.dense_lse_forward(za, zc, off, scale), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("na, nc, p, off", SWEEP_SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "odd"])
def test_sweep_backward_emulation_more_variants(na, nc, p, off, grad_cols):
    za, zc, lse, w, scale, n_grad = _backward_case(na, nc, p, off, grad_cols, seed=2 * na + p)
    want = emu.dense_lse_backward(za, zc, lse, w, off, scale, n_grad)
    for sms, per_sm in [(132, 6), (1, 1)]:
        for fp16 in (False, True):
            got = emu.tc_lse_backward(za, zc, lse, w, off, scale, n_grad, fp16, sms, per_sm)
            _check_backward(got, want)


# The Hopper sweep (sweep_wgmma.cu): the same glue, its own fragments, layouts and ring depth.

@pytest.mark.parametrize("na, nc, p, off", SHAPES + SWEEP_SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])
def test_wgmma_forward_emulation(na, nc, p, off, tau):
    if emu.sweep_tc_dim(p) == 0:
        pytest.skip("the sweep kernels take P <= 256")
    za, zc = _inputs(na, nc, p, off, seed=na + p)
    scale = 1 / tau
    want = emu.dense_lse_forward(za, zc, off, scale)
    for sms, per_sm in [(132, 2), (1, 1)]:  # many splits and one
        got = emu.wgmma_lse_forward(za, zc, off, scale, scale <= 40, sms, per_sm)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("na, nc, p, off", SHAPES + SWEEP_SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "none", "odd"])
def test_wgmma_backward_emulation(na, nc, p, off, grad_cols):
    if emu.sweep_tc_dim(p) == 0:
        pytest.skip("the sweep kernels take P <= 256")
    za, zc, lse, w, scale, n_grad = _backward_case(na, nc, p, off, grad_cols, seed=2 * na + p)
    want = emu.dense_lse_backward(za, zc, lse, w, off, scale, n_grad)
    for sms, per_sm in [(132, 2), (1, 1)]:
        got = emu.wgmma_lse_backward(za, zc, lse, w, off, scale, n_grad, grad_cols == "odd",
                                     sms, per_sm)
        _check_backward(got, want)


@pytest.mark.parametrize("p", [200, 256])
def test_wgmma_at_256_features(p):
    """D = 256: a 2-stage ring, 128 accumulator floats per thread, a 64 x 256 RS product."""
    za, zc, lse, w, scale, n_grad = _backward_case(20, 200, p, 0, "all", seed=p)
    np.testing.assert_allclose(emu.wgmma_lse_forward(za, zc, 0, scale, True, 132, 2),
                               emu.dense_lse_forward(za, zc, 0, scale), rtol=1e-12)
    for fp16 in (False, True):
        _check_backward(emu.wgmma_lse_backward(za, zc, lse, w, 0, scale, n_grad, fp16, 132, 2),
                        emu.dense_lse_backward(za, zc, lse, w, 0, scale, n_grad))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_wgmma_layouts_and_fragments(d):
    """The emulator's wgmma pieces: the swizzled tile is a bijection onto d x 64 x 2 bytes
    whose 16-byte chunks stay whole, each 8-thread phase of the copy hits 8 bank groups, the
    accumulator and register-A fragments cover their matrices once, the score view and the A
    view of the same registers agree on every element's (row, column), and the ring fits."""
    r, k = np.meshgrid(np.arange(64), np.arange(d), indexing="ij")
    off = emu.sw128_offset(d, r, k)
    assert sorted(off.ravel()) == list(range(64 * d))
    chunks = off.reshape(64, d // 8, 8)  # 8 features: one 16-byte cp.async, contiguous
    assert (chunks[:, :, 0] % 8 == 0).all() and (np.diff(chunks, axis=2) == 1).all()
    threads = np.arange(emu.THREADS)
    for ph in range(0, emu.THREADS, 8):
        t = threads[ph: ph + 8]
        dst = emu.sw128_offset(d, t >> 3, 8 * (t & 7))
        assert len(set((dst // 8) % 8)) == 8
    row, col = emu.wgmma_acc_coords(64)
    assert len(set(zip(row.ravel(), col.ravel()))) == 64 * 64
    for kb in range(4):
        arow, ak = emu.wgmma_a_coords(kb)
        v = emu.scores_as_a_value(kb, np.arange(8))
        # The register that holds score (row, col) is the A element (row, k = col).
        assert (arow == row[:, v]).all() and (ak == col[:, v]).all()
    for sm in (emu.wgmma_smem_bytes(d),):
        assert sm <= 227 * 1024
    src = np.random.default_rng(d).standard_normal((64, d))
    tile = emu.wgmma_load_tile(d, src, 0)
    np.testing.assert_array_equal(emu.wgmma_tile_matrix(d, tile), src)
    np.testing.assert_array_equal(emu.wgmma_tile_matrix(d, tile, transposed=True), src.T)


# --------------------------------------------------------------------------------------------
# The float32 sweep (sweep_simt.cu)
# --------------------------------------------------------------------------------------------

SIMT_SHAPES = SHAPES + SWEEP_SHAPES + [
    (20, 70, 200, 0),     # D = 256: steps of 16 rows, the last tile has one step, not four
    (33, 97, 256, -1),    # D = 256 exactly, 2-stage ring
    (70, 150, 128, 100),  # D = 128, steps of 32 rows, the pair in the second tile's rows
]


def _simt_case(p):
    if emu.sweep_tc_dim(p) == 0:
        pytest.skip("the float32 sweep takes P <= 256")


@pytest.mark.parametrize("na, nc, p, off", SIMT_SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])
def test_simt_forward_emulation(na, nc, p, off, tau, sms, per_sm):
    _simt_case(p)
    za, zc = _inputs(na, nc, p, off, seed=na + p)
    scale = 1 / tau
    got = emu.simt_lse_forward(za, zc, off, scale, scale <= 40, sms, per_sm)
    np.testing.assert_allclose(got, emu.dense_lse_forward(za, zc, off, scale), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("na, nc, p, off", SIMT_SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "none", "odd"])
@pytest.mark.parametrize("sms, per_sm", [(132, 6), (1, 1)])
def test_simt_backward_emulation(na, nc, p, off, grad_cols, sms, per_sm):
    _simt_case(p)
    za, zc, lse, w, scale, n_grad = _backward_case(na, nc, p, off, grad_cols, seed=2 * na + p)
    want = emu.dense_lse_backward(za, zc, lse, w, off, scale, n_grad)
    got = emu.simt_lse_backward(za, zc, lse, w, off, scale, n_grad, sms, per_sm)
    _check_backward(got, want)


def test_simt_emulation_is_not_vacuous(monkeypatch):
    """The emulated kernel fails when one of its pieces is off: overlapping shared-memory rows,
    rows not padded to whole 16-byte chunks (unaligned cp.async sources), or shuffles from the
    wrong lanes."""
    za, zc, lse, w, scale, n_grad = _backward_case(37, 101, 19, 0, "all", seed=1)
    want = emu.dense_lse_backward(za, zc, lse, w, 0, scale, n_grad)
    _check_backward(emu.simt_lse_backward(za, zc, lse, w, 0, scale, n_grad, 132, 6), want)

    real_config = emu.simt_config
    monkeypatch.setattr(emu, "simt_config",
                        lambda d: (real_config(d)[0], d - 4, real_config(d)[2]))
    with pytest.raises(AssertionError, match="into one chunk"):  # rows D - 4 apart: they overlap
        emu.simt_lse_backward(za, zc, lse, w, 0, scale, n_grad, 132, 6)
    monkeypatch.setattr(emu, "simt_config", real_config)

    real_operand, real_check = emu.simt_operand, emu.simt_launch_check
    monkeypatch.setattr(emu, "simt_operand", lambda z: (z, z.shape[1]))  # no chunk padding
    with pytest.raises(ValueError, match="cudaErrorInvalidValue"):  # the launcher refuses
        emu.simt_lse_backward(za, zc, lse, w, 0, scale, n_grad, 132, 6)
    monkeypatch.setattr(emu, "simt_launch_check", lambda *args: None)
    with pytest.raises(AssertionError, match="unaligned"):  # P = 19: rows 76 bytes apart
        emu.simt_lse_backward(za, zc, lse, w, 0, scale, n_grad, 132, 6)
    monkeypatch.setattr(emu, "simt_operand", real_operand)
    monkeypatch.setattr(emu, "simt_launch_check", real_check)

    real_thread = emu.THREAD
    monkeypatch.setattr(emu, "THREAD", np.roll(real_thread, 1))  # shuffles from other lanes
    with pytest.raises(AssertionError):
        _check_backward(emu.simt_lse_backward(za, zc, lse, w, 0, scale, n_grad, 132, 6), want)


def _one_row(layout, v):
    """The (1, P) row v with a row stride that a one-row tensor may keep after .contiguous()."""
    p = v.shape[0]
    if layout == "transposed column":  # torch.randn(P, 1).t(): rows 1 float apart
        buf = v.astype(np.float64)
        return np.lib.stride_tricks.as_strided(buf, (1, p), (buf.itemsize, buf.itemsize))
    width = p + 2 if layout == "narrowed row" else 5 * p  # z[i:i + 1, :P] of a wider z
    wide = np.zeros((1, width))
    wide[0, :p] = v
    return wide[:, :p]


def test_torch_keeps_any_row_stride_of_a_one_row_tensor():
    """The premise of the next test: .contiguous() hands a one-row tensor back unchanged
    whatever its row stride (torch ignores the strides of size-1 dimensions), and the library's
    normalization keeps it: one forget row given as a transposed column reaches the kernels
    with rows 1 float apart; one row narrowed from a 66-wide tensor, 66 floats apart (with a
    16-byte aligned base: no copy)."""
    torch = pytest.importorskip("torch")
    from clreg_fast.backends.base import SimilarityKernels

    z, _ = SimilarityKernels().project_normalize(torch.randn(64, 1).t(), None, None)
    assert z.contiguous().stride() == (1, 1)
    narrowed = torch.randn(4, 66)[2:3, :64]
    assert narrowed.contiguous().stride() == (66, 1) and narrowed.data_ptr() % 16 == 0
    for layout, stride0 in (("transposed column", 1), ("narrowed row", 66),
                            ("row of a wider tensor", 320)):
        row = _one_row(layout, np.ones(64))
        assert emu.torch_contiguous(row) is row and row.strides[0] // row.itemsize == stride0


@pytest.mark.parametrize("layout", ["transposed column", "narrowed row", "row of a wider tensor"])
@pytest.mark.parametrize("p", [64, 100, 256])
@pytest.mark.parametrize("one_row", ["anchors", "columns"])
def test_simt_one_row_operand_with_any_row_stride(layout, p, one_row):
    """A one-row operand is read as the row it is, whatever its stride(0): the glue passes
    size(1) as the row stride, not stride(0), which launch_sweep_simt rejects when it is not
    a multiple of 4 floats (cudaErrorInvalidValue: the loss call fails)."""
    za, zc = _inputs(5, 37, p, 0, seed=p)
    off = 0
    if one_row == "anchors":
        za = _one_row(layout, za[0].copy())  # zc[0] is the same row: the left-out pair
    else:
        zc, off = _one_row(layout, zc[0].copy()), 1000
    scale = 10.0
    want_lse = emu.dense_lse_forward(za, zc, off, scale)
    got = emu.simt_lse_forward(za, zc, off, scale, True, 132, 6)
    np.testing.assert_allclose(got, want_lse, rtol=1e-12, atol=1e-12)
    w = np.linspace(-1.0, 1.0, za.shape[0]) / za.shape[0]
    n_grad = zc.shape[0]
    want = emu.dense_lse_backward(za, zc, want_lse, w, off, scale, n_grad)
    _check_backward(emu.simt_lse_backward(za, zc, want_lse, w, off, scale, n_grad, 132, 6), want)


def test_simt_operand_copies_rows_that_are_not_whole_chunks():
    """simt_operand() copies (rows padded to 4 floats, 16-byte aligned) when P % 4 != 0 or the
    base is not 16-byte aligned, and only then; the copy passes the launch's checks."""
    assert emu.simt_operand_layout(64, 0) == (False, 64)
    assert emu.simt_operand_layout(64, 4) == (True, 64)    # z[1:] of a flat buffer
    assert emu.simt_operand_layout(19, 0) == (True, 20)
    assert emu.simt_operand_layout(130, 32) == (True, 132)
    emu.simt_launch_check(20, 0, 132, 0, 19, 64, 64)
    with pytest.raises(ValueError):  # the uncopied rows of P = 19 would be rejected
        emu.simt_launch_check(19, 0, 19, 0, 19, 64, 64)
    with pytest.raises(ValueError):  # and so would a misaligned base
        emu.simt_launch_check(64, 4, 64, 0, 64, 64, 64)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_simt_shared_memory_budget_and_banks(d):
    """SimtConfig<D>: the owned tile and the ring fit 99 KB; every 8-lane phase of the 16-byte
    score reads and of the cp.async stores hits 8 different bank groups; the 4-byte reads of
    the product touch 32 different banks or one address (broadcast)."""
    rows, ld, stages = emu.simt_config(d)
    assert rows * d == 4096 and rows % 16 == 0 and 64 % rows == 0
    assert 4 * (64 * ld + stages * (rows * ld + 2 * rows)) <= 99 * 1024
    lanes = emu.LANES
    for warp in range(4):
        t = 32 * warp + lanes
        tx, ty = t & 15, t >> 4
        for k in range(0, d, 4):
            for j in range(rows // 16):
                b = (tx + 16 * j) * ld + k
                for ph in range(0, 32, 8):
                    assert len(set((b[ph:ph + 8] // 4) % 8)) == 8
            for i in range(8):
                a = (ty + 8 * i) * ld + k
                for ph in range(0, 32, 8):
                    assert len(set(a[ph:ph + 8])) == 1  # one row per phase: a broadcast
        for k in range(rows):
            for p in range(d // 16):
                addr = k * ld + tx + 16 * p
                assert len(set(addr % 32)) == len(set(addr)) == 16  # half-warps share addresses
    chunks = d // 4
    for n_rows in (64, rows):
        for it in range(n_rows * chunks // emu.THREADS):
            e = np.arange(emu.THREADS) + it * emu.THREADS
            dst = (e // chunks) * ld + 4 * (e % chunks)
            for ph in range(0, emu.THREADS, 8):
                assert len(set((dst[ph:ph + 8] // 4) % 8)) == 8


@pytest.mark.parametrize("stages", [2, 3])
def test_cp_async_ring_model_catches_wrong_schedules(stages):
    """The ring of sweep_tc_kernel passes the cp.async model for any tile count (fewer tiles
    than stages included); the model is not vacuous: a shallower wait, a deeper prefetch or a
    copy issued before the barrier each fail it."""
    for n_tiles in range(0, 8):
        assert emu.sweep_ring(n_tiles, stages, lambda t: t) == list(range(n_tiles))
    n = 6
    with pytest.raises(AssertionError, match="in flight"):
        emu.sweep_ring(n, stages, lambda t: t, wait_n=stages - 1)
    with pytest.raises(AssertionError, match="in flight"):
        emu.sweep_ring(n, stages, lambda t: t, ahead=stages)
    with pytest.raises(AssertionError, match="without a barrier"):
        emu.sweep_ring(n, stages, lambda t: t, load_before_barrier=True)


@pytest.mark.parametrize("p", [200, 256])
def test_sweep_at_256_features(p):
    """D = 256 runs the backward in steps of 16 swept rows; every path at once, small sizes."""
    za, zc, lse, w, scale, n_grad = _backward_case(20, 70, p, 0, "all", seed=p)
    want_lse = emu.dense_lse_forward(za, zc, 0, scale)
    np.testing.assert_allclose(emu.tc_lse_forward(za, zc, 0, scale, True, 1, 1), want_lse,
                               rtol=1e-12)
    _check_backward(emu.tc_lse_backward(za, zc, lse, w, 0, scale, n_grad, False, 132, 6),
                    emu.dense_lse_backward(za, zc, lse, w, 0, scale, n_grad))


def test_emulated_fragments_are_the_ptx_layouts():
    """The emulator's own pieces: one mma of ldmatrix'ed fragments is a 16 x 16 x 8 product,
    and the transposed read gives the B operand of a [k][n] tile."""
    d = 64
    rng = np.random.default_rng(3)
    src = rng.standard_normal((64, d))
    tile = emu.load_tile(d, src, 0)
    lanes = emu.LANES
    a = emu.ldmatrix_x4(tile, emu.swz(d, lanes & 15, 8 * (lanes >> 4)))
    b = emu.ldmatrix_x4(tile, emu.swz(d, 16 + (lanes & 7) + 8 * (lanes >> 4),
                                      8 * ((lanes >> 3) & 1)))
    c = np.zeros((32, 4))
    emu.mma_16816(c, a, b[0], b[1])
    want = src[:16, :16] @ src[16:24, :16].T
    got = np.zeros((16, 8))
    for t in range(2):
        got[emu.G, 2 * emu.Q + t] = c[:, t]
        got[emu.G + 8, 2 * emu.Q + t] = c[:, 2 + t]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    bt = emu.ldmatrix_x4(tile, emu.swz(d, (lanes & 7) + 8 * ((lanes >> 3) & 1), 8 * (lanes >> 4)),
                         trans=True)
    c = np.zeros((32, 4))
    emu.mma_16816(c, a, bt[0], bt[1])  # A (rows 0-15) . src[0:16, 0:8]
    want = src[:16, :16] @ src[:16, :8]
    for t in range(2):
        got[emu.G, 2 * emu.Q + t] = c[:, t]
        got[emu.G + 8, 2 * emu.Q + t] = c[:, 2 + t]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_sweep_shared_memory_reads_are_conflict_free(d):
    """Each 8-lane phase of every ldmatrix the sweep issues, and each 8-thread phase of the
    16-byte cp.async stores, touches 8 different 16-byte bank groups (the XOR swizzle's job)."""
    lanes = emu.LANES

    def distinct_groups(addr):  # element offsets of one phase; 8 halves = 16 bytes
        assert len(set((a // 8) % 8 for a in addr)) == 8, addr

    for warp_row0 in range(0, 64, 16):
        for kk in range(d // 16):
            a = emu.swz(d, warp_row0 + (lanes & 15), kk * 16 + 8 * (lanes >> 4))
            for j in range(4):
                distinct_groups(a[8 * j: 8 * j + 8])
    for n0 in range(0, 64, 16):
        for kk in range(d // 16):
            b = emu.swz(d, n0 + (lanes & 7) + 8 * (lanes >> 4), kk * 16 + 8 * ((lanes >> 3) & 1))
            for j in range(4):
                distinct_groups(b[8 * j: 8 * j + 8])
        for np_ in range(d // 16):
            bt = emu.swz(d, n0 + (lanes & 7) + 8 * ((lanes >> 3) & 1), np_ * 16 + 8 * (lanes >> 4))
            for j in range(4):
                distinct_groups(bt[8 * j: 8 * j + 8])
    chunks = d // 8
    for it in range(64 * chunks // emu.THREADS):
        e = np.arange(emu.THREADS) + it * emu.THREADS
        dst = emu.swz(d, e // chunks, (e % chunks) * 8)
        assert len(set(dst)) == emu.THREADS
        for ph in range(0, emu.THREADS, 8):
            distinct_groups(dst[ph: ph + 8])


# The kernel statements that tests/_cuda_emulation.py mirrors, whitespace removed. An edit of
# one of them that does not reach the emulation fails test_emulation_follows_the_kernel_source.
KERNEL_EXPRESSIONS = {
    "sweep_tc.cu": [
        "returnr*D+((((k>>3)^(r&7)))<<3);",                                   # swizzle
        "staticconstexprintkStages=D<=128?3:2;",                              # ring depth
        "staticconstexprintkSweptPerStep=D==256?16:64;",
        # load_tile_async / load_vectors_async
        "constintr=e/C::kChunks;", "constintc=e%C::kChunks;",
        "sm80::cp_async_16(tile+swz<D>(r,c*8),src+(row0+r)*D+c*8);",
        "constintc=threadIdx.x&15;",
        "constfloat*src=(threadIdx.x<16?lse:w)+row0+4*c;",
        "sm80::cp_async_16(vec+(threadIdx.x<16?0:kTile)+4*c,src);",
        # score fragments
        "own_tile+swz<D>(warp_row0+(lane&15),kk*16+8*(lane>>4))",            # A of S
        "swz<D>(n0+np*16+(lane&7)+8*(lane>>4),kk*16+8*((lane>>3)&1))",       # B of S
        "sm80::mma_16816<T>(s[2*np],a,b[0],b[1]);",
        "sm80::mma_16816<T>(s[2*np+1],a,b[2],b[3]);",
        # grid, rows, splits
        "constint64_town0=int64_t(blockIdx.x)*kTile;",
        "constint64_ttile_begin=int64_t(blockIdx.y)*tiles_per_split;",
        "constint64_ttile_end=min(tile_begin+tiles_per_split,n_swept_tiles);",
        "own_row[h]=own0+warp_row0+g+8*h;",                                   # fragment row
        "own_ok[h]=own_row[h]<n_own;",
        "if(M==SweepMode::kRows&&own_ok[h])lse_own[h]=__ldg(lse+own_row[h]);",
        # the ring: prologue, then wait -> barrier -> prefetch -> read in every iteration
        "if(st<n_tiles)load_stage(st,tile_begin+st);",
        "if(next<n_tiles)load_stage(next%C::kStages,tile_begin+next);",
        "constT*swept_tile=stage_tile(it%C::kStages);",
        # masks
        "constint64_tsw0=(tile_begin+it)*kTile;",
        "constintn_valid=static_cast<int>(min(int64_t(kTile),n_swept-sw0));",
        "constint64_td=own_row[h]+pair_offset-sw0;",                          # left-out pair
        "diag[h]=(d<0||d>=kTile)?-1:static_cast<int>(d);",
        "constintn0=step*kNB*8;",
        # forward epilogue and merge
        "constintcol=n0+8*nb+2*q+j;",
        "x[nb][j]=(col<n_valid&&col!=diag[h])?scale*s[nb][2*h+j]:-INFINITY;",
        "run_max[h]=fixed_shift?scale:-INFINITY;",
        "for(intmask=1;mask<=2;mask<<=1)",
        "if(q==0&&own_ok[h])",
        "out[int64_t(blockIdx.y)*n_own+own_row[h]]=",
        "(m==-INFINITY||sum==0.f)?-INFINITY:m+logf(sum);",
        # backward epilogue
        "constintcol=n0+8*nb+2*q+(e&1);",                                     # fragment column
        "if(own_ok[h]&&col<n_valid&&col!=diag[h])",
        "p=expf(scale*s[nb][e]-lse_own[h]);",
        "p=vec[kTile+col]*expf(scale*s[nb][e]-vec[col]);",
        "if(std::is_same<T,__half>::value)p*=kFp16ProbScale;",
        "a[0]=sm80::pack2<T>(s[2*kk][0],s[2*kk][1]);",                        # C -> A
        "a[1]=sm80::pack2<T>(s[2*kk][2],s[2*kk][3]);",
        "a[2]=sm80::pack2<T>(s[2*kk+1][0],s[2*kk+1][1]);",
        "a[3]=sm80::pack2<T>(s[2*kk+1][2],s[2*kk+1][3]);",
        "sm80::ldmatrix_x4_trans(b,swept_tile+swz<D>(n0+kk*16+(lane&7)+8*((lane>>3)&1),np*16+8*(lane>>4)));",
        "sm80::mma_16816<T>(acc[2*np],a,b[0],b[1]);",
        "sm80::mma_16816<T>(acc[2*np+1],a,b[2],b[3]);",
        # the one write of the backward
        "float*slice=out+int64_t(blockIdx.y)*round_up(n_own,kTile)*ld_out;",
        "if(8*nd<ld_out){",
        "slice+own_row[h]*ld_out+8*nd+2*q",
        "make_float2(acc[nd][2*h],acc[nd][2*h+1])",
    ],
    "mma_sm80.cuh": [  # the PTX the emulated layouts stand for
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global[%0],[%1],16;",
        "__floats2bfloat162_rn(lo,hi)", "__floats2half2_rn(lo,hi)",
    ],
    "sweep_simt.cu": [
        "staticconstexprintkRows=4096/D;", "staticconstexprintkLd=D+4;",
        "staticconstexprintkStages=D==256?2:3;",
        # load_rows_async / load_vectors_async
        "constintr=e/C::kChunks;", "constintc=e%C::kChunks;",
        "constintbytes=row<n_rows?max(0,min(16,4*(dim-4*c))):0;",
        "cp_async_16_zfill(dst+r*C::kLd+4*c,from,bytes);",
        "cp.async.cg.shared.global[%0],[%1],16,%2;",
        "constintc=threadIdx.x%kQ;",
        "cp_async_16_zfill(vec+(is_lse?0:R)+4*c,(is_lse?lse:w)+row0+4*c,16);",
        # grid, rows, splits, steps
        "constinttx=threadIdx.x&15;", "constintty=threadIdx.x>>4;",
        "constint64_town0=int64_t(blockIdx.x)*kTile;",
        "constint64_ttile_begin=int64_t(blockIdx.y)*tiles_per_split;",
        "constint64_ttile_end=min(tile_begin+tiles_per_split,n_swept_tiles);",
        "ceil_div(min(tile_end*kTile,n_swept)-swept_begin,C::kRows)",
        "own_row[i]=own0+ty+8*i;", "own_ok[i]=own_row[i]<n_own;",
        "lse_own[i]=(M==SweepMode::kRows&&own_ok[i])?__ldg(lse+own_row[i]):0.f;",
        "constint64_trow0=swept_begin+int64_t(step)*C::kRows;",
        "if(st<n_steps)load_stage(st,st);",
        "if(next<n_steps)load_stage(next%C::kStages,next);",
        "constfloat*rows=stage_rows(it%C::kStages);",
        # masks
        "constint64_tsw0=swept_begin+int64_t(it)*C::kRows;",
        "constintn_valid=static_cast<int>(min(int64_t(C::kRows),n_swept-sw0));",
        "constint64_td=own_row[i]+pair_offset-sw0;",
        "diag[i]=(d<0||d>=C::kRows)?-1:static_cast<int>(d);",
        # scores
        "b[j]=*reinterpret_cast<constfloat4*>(rows+(tx+16*j)*C::kLd+k);",
        "*reinterpret_cast<constfloat4*>(own_tile+(ty+8*i)*C::kLd+k);",
        # forward epilogue and merge
        "x[j]=(col<n_valid&&col!=diag[i])?scale*s[i][j]:-INFINITY;",
        "run_max[i]=fixed_shift?scale:-INFINITY;",
        "for(intmask=1;mask<=8;mask<<=1)",
        "if(tx==0&&own_ok[i])",
        "out[int64_t(blockIdx.y)*n_own+own_row[i]]=",
        # backward epilogue and product
        "constintcol=tx+16*j;",
        "if(own_ok[i]&&col<n_valid&&col!=diag[i])",
        "p=expf(scale*s[i][j]-lse_own[i]);",
        "p=vec[C::kRows+col]*expf(scale*s[i][j]-vec[col]);",
        "constintk=kx+16*j;",
        "pk[i]=__shfl_sync(0xffffffffu,s[i][j],kx,16);",
        "b[p]=rows[k*C::kLd+tx+16*p];",
        "acc[i][p]=fmaf(pk[i],b[p],acc[i][p]);",
        # the one write of the backward
        "float*slice=out+int64_t(blockIdx.y)*round_up(n_own,kTile)*ld_out;",
        "constintcol=tx+16*p;",
        "if(col<ld_out)slice[own_row[i]*ld_out+col]=acc[i][p];",
    ],
    "bindings.cpp": [  # the glue that tc_lse_forward / tc_lse_backward mirror
        "splits_for(ceil_div(n_anchor,kTile),ceil_div(n_col,kTile),n_anchor,",
        "splits_for(n_anchor_tiles,n_col_tiles,n_anchor_tiles*kTile*dim_pad,",
        "splits_for(n_grad_tiles,n_anchor_tiles,n_grad_tiles*kTile*dim_pad,",
        "n_anchor,n_col,dim_pad,self_offset,scale_f,false,dim_tc,",
        "acc_cols.data_ptr<float>(),n_grad_cols,n_anchor,dim_pad,-self_offset,scale_f,false,dim_tc,",
        "launch_sweep(loops,SweepMode::kCols,zc_tc.data_ptr(),za_tc.data_ptr(),",
        "(w*(scale_f*tile_scale)).unsqueeze(1)",
        "(w_max*(scale_f*tile_scale))",
        "autow_max=w.abs().max().clamp_min(1e-30);",
        "returntorch::logsumexp(partial,0);",
        # ... and simt_lse_forward / simt_lse_backward
        "if(z.size(1)%4==0&&reinterpret_cast<uintptr_t>(z.data_ptr())%16==0)returnz;",
        "autoout=torch::zeros({z.size(0),round_up(z.size(1),4)},z.options());",
        "resident_blocks_sweep_simt(SweepMode::kForward,dim_s)",
        "launch_sweep_simt(SweepMode::kForward,own.data_ptr<float>(),own.size(1),",
        "swept.data_ptr<float>(),swept.size(1),dim,nullptr,",
        "launch_sweep_simt(SweepMode::kRows,za_s.data_ptr<float>(),za_s.size(1),",
        "zc_s.data_ptr<float>(),zc_s.size(1),dim,lse.data_ptr<float>(),",
        "n_anchor,n_col,dim_pad,self_offset,scale_f,false,dim_s,",
        "launch_sweep_simt(SweepMode::kCols,zc_s.data_ptr<float>(),zc_s.size(1),",
        "za_s.data_ptr<float>(),za_s.size(1),dim,lse_pad.data_ptr<float>(),",
        "acc_cols.data_ptr<float>(),n_grad_cols,n_anchor,dim_pad,",
        "-self_offset,scale_f,false,dim_s,col_splits.count,",
        # the wgmma sweep takes the same arguments through the same launch_sweep calls
        "returnlaunch_sweep_wgmma(mode,own,swept,lse,w,out,n_own,n_swept,ld_out,pair_offset,",
    ],
    "wgmma_layouts.cuh": [  # what wgmma_stages / wgmma_smem_bytes / the views mirror
        "staticconstexprintkStages=D==256?2:3;",
        "kAlignSlack+kTileBytes*(1+kStages)+kVecBytes*kStages;",
        "staticconstexprintkVecBytes=2*kTile*4;",
        "usingAtom=GMMA::Layout_K_SW128_Atom<E>;",
        "staticconstexprintkAlignSlack=1024;",
        "Stride<Int<kTile>,_1,Int<kTile*D>>{})));",                          # RingT
        "returnmake_layout(layout<0,1>(acc),make_layout(layout<0,0>(acc),layout<0,2>(acc)));",
        "returnmake_layout(make_layout(layout<0,0>(acc),layout<0,1>(acc),layout<0>(blocks)),"
        "layout<1>(acc),layout<1>(blocks));",
        "GMMA::rs_op_selector<E,E,float,Shape<Int<kTile>,Int<D>,Int<kTile>>,GMMA::Major::K,"
        "GMMA::Major::MN>()",
    ],
    "sweep_wgmma.cu": [  # what sweep_wgmma_kernel in tests/_cuda_emulation.py mirrors
        "Layout<Shape<_16,_8>,Stride<_8,_1>>{},",                              # tiled copy
        "constint64_town0=int64_t(blockIdx.x)*kTile;",
        "constint64_ttile_begin=int64_t(blockIdx.y)*tiles_per_split;",
        "constint64_ttile_end=min(tile_begin+tiles_per_split,n_swept_tiles);",
        "if(st<n_tiles)load_stage(st,tile_begin+st);",
        "if(next<n_tiles)load_stage(next%kStages,tile_begin+next);",
        "constfloat*src=(tid<16?lse:w)+tile*kTile+4*c;",
        "float*dst=vec_smem+st*2*kTile+(tid<16?0:kTile)+4*c;",
        "own_row[m]=own0+get<0>(coord(m,0));",
        "own_ok[m]=own_row[m]<n_own;",
        "lse_own[m]=(M==SweepMode::kRows&&own_ok[m])?__ldg(lse+own_row[m]):0.f;",
        "run_max[m]=fixed_shift?scale:-INFINITY;",
        "constint64_tsw0=(tile_begin+it)*kTile;",
        "constintn_valid=static_cast<int>(min(int64_t(kTile),n_swept-sw0));",
        "constint64_td=own_row[m]+pair_offset-sw0;",
        "diag[m]=(d<0||d>=kTile)?-1:static_cast<int>(d);",
        "constintcol=get<1>(coord(m,n));",
        "x[n]=(col<n_valid&&col!=diag[m])?scale*scores(m,n):-INFINITY;",
        "if(own_ok[m]&&col<n_valid&&col!=diag[m])",
        "p=expf(scale*scores(m,n)-lse_own[m]);",
        "p=vec[kTile+col]*expf(scale*scores(m,n)-vec[col]);",
        "if(std::is_same<T,__half>::value)p*=kFp16ProbScale;",
        "probs_rc(m,n)=E(p);",
        "Tensorprobs_a=make_tensor(probs.data(),scores_as_a(probs.layout()));",
        "wgmma_gemm<false,true>(mma_o,probs_a,t_swept_t(_,_,_,st),t_acc);",
        "for(intmask=1;mask<=2;mask<<=1)",
        "if(q==0&&own_ok[m])",
        "out[int64_t(blockIdx.y)*n_own+own_row[m]]=",
        "(mx==-INFINITY||sum==0.f)?-INFINITY:mx+logf(sum);",
        "float*slice=out+int64_t(blockIdx.y)*round_up(n_own,kTile)*ld_out;",
        "for(intn=0;n<size<1>(acc);n+=2){",
        "if(col<ld_out)",
        "*reinterpret_cast<float2*>(slice+(own0+row)*ld_out+col)=",
        "make_float2(acc(m,n),acc(m,n+1));",
        # one committed, waited-for batch per product, operands fenced: the accumulator and,
        # for the RS product, the register A operand (P) on both sides of the batch; the
        # scores start from zero (ScaleOut::Zero on the first k block only), which the
        # emulation's fresh wgmma_ss result assumes
        "ifconstexpr(kRegA)warpgroup_fence_operand(a);warpgroup_fence_operand(c);"
        "warpgroup_arrive();ifconstexpr(kZeroInit)mma.accumulate_=GMMA::ScaleOut::Zero;",
        "cute::gemm(mma,a(_,_,k),b(_,_,k),c);mma.accumulate_=GMMA::ScaleOut::One;",
        "warpgroup_commit_batch();warpgroup_wait<0>();warpgroup_fence_operand(c);"
        "ifconstexpr(kRegA)warpgroup_fence_operand(a);",
        # 128-byte swizzled tiles on 1024-byte boundaries (descriptor base_offset 0)
        "(reinterpret_cast<uintptr_t>(smem_raw)+C::kAlignSlack-1)&~uintptr_t(C::kAlignSlack-1));",
        "E*ring_smem=reinterpret_cast<E*>(smem+C::kTileBytes);",
    ],
}
# Statements that must come in this order inside sweep_tc_kernel's main loop.
RING_ORDER = [
    "for(intit=0;it<n_tiles;++it){",
    "sm80::cp_async_wait<C::kStages-2>();",
    "__syncthreads();",
    "constintnext=it+C::kStages-1;",
    "constT*swept_tile=stage_tile(it%C::kStages);",
    "sm80::cp_async_wait<0>();",
]


def _kernel_sources():
    import pathlib
    import re

    csrc = pathlib.Path(__file__).parents[1] / "csrc"
    return {name: re.sub(r"\s+", "", (csrc / name).read_text()) for name in KERNEL_EXPRESSIONS}


# The same for sweep_wgmma_kernel, with the proxy fence between the cp.async writes and the
# barrier before any wgmma reads them.
WGMMA_RING_ORDER = [
    "for(intit=0;it<n_tiles;++it){",
    "cp_async_wait<kStages-2>();",
    "cutlass::arch::fence_view_async_shared();",
    "__syncthreads();",
    "constintnext=it+kStages-1;",
    "wgmma_gemm<true,false>(mma_s,t_own,t_swept(_,_,_,st),t_scores);",
    "cp_async_wait<0>();",
]


# The same order in sweep_simt_kernel's main loop.
SIMT_RING_ORDER = [
    "for(intit=0;it<n_steps;++it){",
    "cp_async_wait<C::kStages-2>();",
    "__syncthreads();",
    "constintnext=it+C::kStages-1;",
    "constfloat*rows=stage_rows(it%C::kStages);",
    "cp_async_wait<0>();",
]


def _source_mismatches(sources):
    missing = [f"{name}: {e}" for name, exprs in KERNEL_EXPRESSIONS.items() for e in exprs
               if e not in sources[name]]
    for name, order in (("sweep_tc.cu", RING_ORDER), ("sweep_wgmma.cu", WGMMA_RING_ORDER),
                        ("sweep_simt.cu", SIMT_RING_ORDER)):
        src, pos = sources[name], -1
        for stmt in order:
            nxt = src.find(stmt, pos + 1)
            if nxt < 0:
                missing.append(f"{name}: {stmt} (in this order: {order})")
                break
            pos = nxt
    return missing


def test_emulation_follows_the_kernel_source():
    """The formulas emulated above are the ones in csrc/ (whitespace ignored): an edit of the
    kernel or the glue that does not reach the emulation fails here."""
    assert _source_mismatches(_kernel_sources()) == []


@pytest.mark.parametrize("old, new", [
    ("b[0],b[1]);", "b[1],b[0]);"),                       # swapped B fragments
    ("col<n_valid&&col!=diag[h]", "col<=n_valid&&col!=diag[h]"),
    ("sm80::cp_async_wait<C::kStages-2>();__syncthreads();",
     "__syncthreads();sm80::cp_async_wait<C::kStages-2>();"),  # barrier before the wait
])
def test_kernel_source_check_is_not_vacuous(old, new):
    sources = _kernel_sources()
    assert old in sources["sweep_tc.cu"]
    sources["sweep_tc.cu"] = sources["sweep_tc.cu"].replace(old, new, 1)
    assert _source_mismatches(sources)


@pytest.mark.parametrize("old, new", [
    ("cutlass::arch::fence_view_async_shared();__syncthreads();",
     "__syncthreads();cutlass::arch::fence_view_async_shared();"),  # fence after the barrier
    ("col<n_valid&&col!=diag[m]", "col<=n_valid&&col!=diag[m]"),
    ("warpgroup_commit_batch();warpgroup_wait<0>();", "warpgroup_commit_batch();"),
    ("ifconstexpr(kRegA)warpgroup_fence_operand(a);warpgroup_fence_operand(c);",
     "warpgroup_fence_operand(c);"),                                 # P not fenced before arrive
    ("mma.accumulate_=GMMA::ScaleOut::Zero;", ""),                   # scores accumulate tiles
    ("&~uintptr_t(C::kAlignSlack-1)", "&~uintptr_t(127)"),         # 128-byte aligned only
])
def test_wgmma_source_check_is_not_vacuous(old, new):
    sources = _kernel_sources()
    assert old in sources["sweep_wgmma.cu"]
    sources["sweep_wgmma.cu"] = sources["sweep_wgmma.cu"].replace(old, new, 1)
    assert _source_mismatches(sources)


@pytest.mark.parametrize("old, new", [
    ("__shfl_sync(0xffffffffu,s[i][j],kx,16)", "__shfl_sync(0xffffffffu,s[i][j],kx,32)"),
    ("col<n_valid&&col!=diag[i]", "col<=n_valid&&col!=diag[i]"),
    ("cp_async_wait<C::kStages-2>();__syncthreads();",
     "__syncthreads();cp_async_wait<C::kStages-2>();"),  # barrier before the wait
])
def test_simt_source_check_is_not_vacuous(old, new):
    sources = _kernel_sources()
    assert old in sources["sweep_simt.cu"]
    sources["sweep_simt.cu"] = sources["sweep_simt.cu"].replace(old, new, 1)
    assert _source_mismatches(sources)


def test_emulated_mma_fragments_follow_the_ptx_tables_element_by_element():
    """An independent transcription of the PTX ISA tables for mma.m16n8k16 (.f16/.bf16, "Matrix
    Fragments for mma.m16n8k16"), element index i as the ISA numbers them (two per 32-bit
    register, the lower index in the lower half), against the emulator's register-wise maps:
        A: row = groupID for a_i with i < 2 or 4 <= i < 6, else groupID + 8;
           col = 2 threadID_in_group + (i & 1), + 8 for i >= 4
        B: row = 2 threadID_in_group + (i & 1), + 8 for i >= 2; col = groupID
        C: row = groupID for c_i with i < 2, else groupID + 8; col = 2 threadID_in_group + (i & 1)
    A mistake shared by the emulator's ldmatrix and mma (which the product test above would not
    see) shows up here."""
    rng = np.random.default_rng(7)
    A, B = rng.standard_normal((16, 16)), rng.standard_normal((16, 8))
    a = np.empty((4, 32, 2))
    b0, b1 = np.empty((32, 2)), np.empty((32, 2))
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(8):
            row = gid if (i < 2 or 4 <= i < 6) else gid + 8
            col = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
            a[i // 2, lane, i % 2] = A[row, col]
        for i in range(4):
            row = 2 * tig + (i & 1) + (8 if i >= 2 else 0)
            (b0 if i < 2 else b1)[lane, i % 2] = B[row, gid]
    c = np.zeros((32, 4))
    emu.mma_16816(c, a, b0, b1)
    want = A @ B
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        for i in range(4):
            row = gid if i < 2 else gid + 8
            assert c[lane, i] == pytest.approx(want[row, 2 * tig + (i & 1)], rel=1e-12, abs=1e-12)
    # ldmatrix (PTX ISA, ldmatrix): thread 8j + r gives the address of row r of matrix j; each
    # thread then holds row lane / 4, elements 2 (lane % 4) and + 1 of each matrix (.trans: of
    # the transposed matrix).
    tile = rng.standard_normal(64 * 8)
    addr = 8 * ((np.arange(32) * 5) % 64)  # any 32 row addresses of 16 bytes
    for trans in (False, True):
        regs = emu.ldmatrix_x4(tile, addr, trans=trans)
        for j in range(4):
            mat = np.stack([tile[addr[8 * j + r]: addr[8 * j + r] + 8] for r in range(8)])
            if trans:
                mat = mat.T
            for lane in range(32):
                assert list(regs[j, lane]) == [mat[lane // 4, 2 * (lane % 4)],
                                               mat[lane // 4, 2 * (lane % 4) + 1]]


# --------------------------------------------------------------------------------------------
# The wgmma emulation against CuTe itself (host code, no GPU)
# --------------------------------------------------------------------------------------------

def _wgmma_layout_probe_output(script="wgmma_layout_probe"):
    """Output of scripts/<script>.cu (CuTe's answer for the kernel's layouts and fragment views,
    or its descriptors), compiled once per source version into build/; None when nvcc or the
    CUTLASS headers are missing."""
    import hashlib
    import os
    import subprocess

    from clreg_fast.backends.cuda import build_env

    cuda_home, _ = build_env.find_cuda_home()
    include, _ = build_env.find_cutlass_include()
    if cuda_home is None or include is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(root, "scripts", script + ".cu"),
               os.path.join(root, "csrc", "wgmma_layouts.cuh"), os.path.join(root, "csrc", "clreg.h")]
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in sources)).hexdigest()[:16]
    exe = os.path.join(root, "build", script, digest, "probe")
    if not os.path.isfile(exe):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "-std=c++17",
                        "--expt-relaxed-constexpr", "-O1", f"-I{os.path.join(root, 'csrc')}",
                        f"-I{include}", "-o", exe, sources[0]], check=True, timeout=900)
    return subprocess.run([exe], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_wgmma_emulation_matches_cute_layouts():
    """Every layout and fragment formula of the wgmma emulation is what CuTe computes for the
    kernel (shared-memory tiles and the transposed ring view, accumulator coordinates of both
    tiled MMAs and the register-A coordinates of the RS product for all 128 threads, the
    rows_cols and scores_as_a views, shared memory size). With the acc and A coordinates both
    CuTe's, the emulation's check that score value 8 kb + i and A element (kb, i) sit at the same
    (row, column) is a check of the kernel's P -> A reuse."""
    out = _wgmma_layout_probe_output()
    if out is None:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass or "
                    "CLREG_FAST_CUTLASS_INCLUDE)")
    seen = set()
    for line in out.splitlines():
        tag, *vals = line.split()
        vals = [int(v) for v in vals]
        seen.add(tag)
        if tag == "tile":
            d, r, k, off = vals
            assert emu.sw128_offset(d, r, k) == off, line
        elif tag == "ringt_mismatches":
            assert vals[1] == 0, line
        elif tag == "smem":
            assert emu.wgmma_smem_bytes(vals[0]) == vals[1], line
        elif tag == "acc":
            n, t, v, row, col = vals
            erow, ecol = emu.wgmma_acc_coords(n)
            assert (erow[t, v], ecol[t, v]) == (row, col), line
        elif tag == "view":
            n, m, col, v = vals
            assert emu.rows_cols_value(m, col) == v, line
        elif tag == "a":
            kb, i, v = vals
            assert emu.scores_as_a_value(kb, i) == v, line
        elif tag == "acoord":
            t, kb, i, row, k = vals
            erow, ek = emu.wgmma_a_coords(kb)
            assert (erow[t, i], ek[t, i]) == (row, k), line
    assert seen == {"tile", "ringt_mismatches", "smem", "acc", "view", "a", "acoord"}, seen


def _wgmma_descriptors():
    out = _wgmma_layout_probe_output("wgmma_desc_probe")
    if out is None:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass or "
                    "CLREG_FAST_CUTLASS_INCLUDE)")
    descs = {}
    for line in out.splitlines():
        if not line.startswith("desc "):  # CuTe's host-side "ERROR: cast_smem_ptr_to_uint" lines
            continue
        _, operand, *vals = line.split()
        d, stage, kb, start, lbo, sbo, base_offset, layout_type = map(int, vals)
        descs[operand, d, stage, kb] = dict(start=start, lbo=lbo, sbo=sbo,
                                            base_offset=base_offset, layout_type=layout_type)
    return descs


_WGMMA_OPERAND_MAJOR = {"scores_a": "K", "scores_b": "K", "product_b": "MN"}


@pytest.mark.slow
def test_wgmma_descriptors_read_the_emulated_matrices():
    """The descriptors CuTe builds for every wgmma of the kernel (owned tile and ring for the
    scores, the MN-major RingT view for the product; every D, stage and k block), decoded with
    the PTX ISA's canonical layouts, address exactly the elements the emulation multiplies. This
    is the check that the transposed view became a canonical MN-major SW128 descriptor (LBO
    between 64-feature blocks, SBO between 8-row groups), not only that CuTe compiled it."""
    descs = _wgmma_descriptors()
    for d in (64, 128, 256):
        stages = emu.wgmma_stages(d)
        want = ([("scores_a", 0, kb) for kb in range(d // 16)]
                + [("scores_b", s, kb) for s in range(stages) for kb in range(d // 16)]
                + [("product_b", s, kb) for s in range(stages) for kb in range(emu.TILE // 16)])
        assert {(o, s, kb) for (o, dd, s, kb) in descs if dd == d} == set(want), d
        for operand, stage, kb in want:
            mn = d if operand == "product_b" else emu.TILE
            got = emu.gmma_desc_addresses(descs[operand, d, stage, kb],
                                          _WGMMA_OPERAND_MAJOR[operand], mn)
            np.testing.assert_array_equal(
                got, emu.wgmma_operand_addresses(operand, d, stage, kb),
                err_msg=f"{operand} D={d} stage={stage} k block={kb}: {descs[operand, d, stage, kb]}")


@pytest.mark.slow
def test_wgmma_descriptor_check_is_not_vacuous():
    """The decoder tells a wrong descriptor from a right one: the product's B read K-major, or
    with LBO and SBO swapped (D >= 128 uses both), or one stage off, addresses other elements."""
    descs = _wgmma_descriptors()
    for d in (128, 256):
        desc = descs["product_b", d, 1, 2]
        want = emu.wgmma_operand_addresses("product_b", d, 1, 2)
        assert (emu.gmma_desc_addresses(desc, "MN", d) == want).all()
        assert not (emu.gmma_desc_addresses(desc, "K", d) == want).all()
        swapped = dict(desc, lbo=desc["sbo"], sbo=desc["lbo"])
        assert not (emu.gmma_desc_addresses(swapped, "MN", d) == want).all()
        other_stage = descs["product_b", d, 0, 2]
        assert not (emu.gmma_desc_addresses(other_stage, "MN", d) == want).all()


@pytest.mark.parametrize("mutation", ["k halves of A swapped", "k pairs of A swapped",
                                      "copy unswizzled"])
def test_wgmma_emulation_is_not_vacuous(mutation, monkeypatch):
    """The emulated wgmma sweep fails against dense math when a fragment or shared-memory
    formula it shares with the kernel is wrong: P given to the RS product with its k halves
    (value 8 kb + 4 + i for 8 kb + i) or the two halves of a register swapped, or tiles stored
    unswizzled by the copy but read through the swizzled layout. (The ring's wait counts are
    mutation-tested with the sm_80 sweep, whose ring model this one shares.)"""
    za, zc, lse, w, scale, n_grad = _backward_case(70, 150, 128, 0, "all", seed=7)
    want = emu.dense_lse_backward(za, zc, lse, w, 0, scale, n_grad)
    _check_backward(emu.wgmma_lse_backward(za, zc, lse, w, 0, scale, n_grad, False, 132, 2), want)
    if mutation == "k halves of A swapped":
        monkeypatch.setattr(emu, "scores_as_a_value", lambda kb, i: (i ^ 4) + 8 * kb)
    elif mutation == "k pairs of A swapped":
        monkeypatch.setattr(emu, "scores_as_a_value", lambda kb, i: (i ^ 1) + 8 * kb)
    else:
        monkeypatch.setattr(emu, "wgmma_load_tile", _unswizzled_tile)
    try:
        got = emu.wgmma_lse_backward(za, zc, lse, w, 0, scale, n_grad, False, 132, 2)
    except AssertionError:
        return  # the emulation's own checks (coverage, ring) caught it
    with pytest.raises(AssertionError):
        _check_backward(got, want)


def _unswizzled_tile(d, src, row0):
    """wgmma_load_tile with row-major 128-byte rows inside each 8 x 64 atom (no XOR)."""
    tile = np.full(emu.TILE * d, np.nan)
    r, k = np.meshgrid(np.arange(emu.TILE), np.arange(d), indexing="ij")
    off = ((r >> 3) + (emu.TILE // 8) * (k >> 6)) * 512 + (r & 7) * 64 + (k & 63)
    tile[off] = src[row0 + r, k]
    return tile

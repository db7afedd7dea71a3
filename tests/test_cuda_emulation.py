"""The CUDA kernels' loop structure, emulated in float64 on CPU (tests/_cuda_emulation.py).

No GPU runs here: these tests check what a GPU run cannot be trusted to reveal alone -- the
split policy (csrc/splits.h) and, for every kernel, the tile order, split ranges, masks, the
left-out pair at any offset, lane ownership, merges, the workspace slices and the glue's
reduction -- against dense float64 math. What the hardware
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

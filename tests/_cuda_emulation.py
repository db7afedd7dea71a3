"""Float64 emulations of the CUDA kernels' loop structure (csrc/), for CPU tests.

No GPU has to run for these: each function follows its kernel statement by statement (grid,
split ranges, tile order, masks, left-out pair, lane ownership, merges, workspace slices and the
glue's reduction in csrc/bindings.cpp), with float64 arithmetic in place of the hardware's.
tests/test_cuda_emulation.py compares them with dense float64 math on odd sizes.
"""
from __future__ import annotations

import numpy as np

from clreg_fast.backends.cuda.splits import TILE, backward_splits, forward_splits

THREADS = 128
FP16_PROB_SCALE = 4096.0


def _ceil_div(a, b):
    return (a + b - 1) // b


def _round_up(a, b):
    return _ceil_div(a, b) * b


def _padded(x, rows, cols):
    out = np.zeros((rows, cols))
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _logsumexp0(partial):
    m = partial.max(axis=0)
    finite = np.isfinite(m)
    out = np.full(partial.shape[1], -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[finite] = m[finite] + np.log(np.exp(partial[:, finite] - m[finite]).sum(axis=0))
    return out


# ---------------------------------------------------------------------------------------------
# The SIMT / WMMA kernels (lse_forward.cu, lse_backward.cu, tiles.cuh).
# ---------------------------------------------------------------------------------------------

def legacy_lse_forward(za, zc, self_offset, scale, fixed_shift, multiprocessors, blocks_per_sm):
    na, nc = za.shape[0], zc.shape[0]
    count, per = forward_splits(na, nc, multiprocessors, blocks_per_sm)
    n_col_tiles = _ceil_div(nc, TILE)
    a_pad = _padded(za, _round_up(na, TILE), za.shape[1])
    c_pad = _padded(zc, _round_up(nc, TILE), zc.shape[1])
    partial = np.full((count, na), np.nan)  # torch::empty: every read element must be written
    tid = np.arange(THREADS)
    r, c_base = tid >> 1, (tid & 1) * 32
    for bx in range(_ceil_div(na, TILE)):
        row0 = bx * TILE
        row = row0 + r
        for by in range(count):
            run_max = np.full(THREADS, scale if fixed_shift else -np.inf)
            run_sum = np.zeros(THREADS)
            for t in range(by * per, min(by * per + per, n_col_tiles)):
                col0 = t * TILE
                s = a_pad[row0:row0 + TILE] @ c_pad[col0:col0 + TILE].T  # sm.s
                cols = col0 + c_base[:, None] + np.arange(32)[None, :]
                ok = (cols < nc) & (cols != (row + self_offset)[:, None])
                x = np.where(ok, scale * s[r[:, None], cols - col0], -np.inf)
                if not fixed_shift:
                    tile_max = x.max(axis=1)
                    grow = tile_max > run_max
                    with np.errstate(invalid="ignore"):
                        run_sum = np.where(grow, run_sum * np.exp(run_max - tile_max), run_sum)
                    run_max = np.where(grow, tile_max, run_max)
                live = run_max != -np.inf
                with np.errstate(invalid="ignore"):
                    add = np.where(ok, np.exp(x - run_max[:, None]), 0.0).sum(axis=1)
                run_sum = np.where(live, run_sum + add, run_sum)
            other_max, other_sum = run_max[tid ^ 1], run_sum[tid ^ 1]
            m = np.maximum(run_max, other_max)
            lse = np.full(THREADS, -np.inf)
            with np.errstate(invalid="ignore", divide="ignore"):
                total = run_sum * np.exp(run_max - m) + other_sum * np.exp(other_max - m)
                lse = np.where(m != -np.inf, m + np.log(total), -np.inf)
            write = ((tid & 1) == 0) & (row < na)
            partial[by, row[write]] = lse[write]
    return partial[0] if count == 1 else _logsumexp0(partial)


def _legacy_probabilities(s, row0, col0, na, nc, self_offset, scale, lse_vec, w_vec, fp16):
    m = np.arange(TILE)[:, None]
    n = np.arange(TILE)[None, :]
    ok = (row0 + m < na) & (col0 + n < nc) & (col0 + n != row0 + m + self_offset)
    with np.errstate(over="ignore"):
        p = np.where(ok, np.exp(scale * s - lse_vec[:, None]), 0.0)
    if w_vec is not None:
        p = p * w_vec[:, None]
    return p * FP16_PROB_SCALE if fp16 else p


def legacy_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, fp16, multiprocessors,
                        blocks_per_sm):
    na, nc, p_dim = za.shape[0], zc.shape[0], za.shape[1]
    dim_pad = _round_up(p_dim, TILE)
    a_pad = _padded(za, _round_up(na, TILE), dim_pad)
    c_pad = _padded(zc, _round_up(nc, TILE), dim_pad)
    tile_scale = 1.0 / FP16_PROB_SCALE if fp16 else 1.0
    n_anchor_tiles, n_col_tiles = _ceil_div(na, TILE), _ceil_div(nc, TILE)

    count, per = backward_splits(na, nc, p_dim, multiprocessors, blocks_per_sm)
    acc_rows = np.zeros((count, n_anchor_tiles * TILE, dim_pad))
    for bx in range(n_anchor_tiles):
        row0 = bx * TILE
        lse_vec = np.array([lse[row0 + i] if row0 + i < na else 0.0 for i in range(TILE)])
        for by in range(count):
            for t in range(by * per, min(by * per + per, n_col_tiles)):
                col0 = t * TILE
                s = a_pad[row0:row0 + TILE] @ c_pad[col0:col0 + TILE].T
                g = _legacy_probabilities(s, row0, col0, na, nc, self_offset, scale, lse_vec,
                                          None, fp16)
                acc_rows[by, row0:row0 + TILE] += g @ c_pad[col0:col0 + TILE]
    rows = acc_rows[0] if count == 1 else acc_rows.sum(0)
    dza = rows[:na, :p_dim] * (w * (scale * tile_scale))[:, None]
    if n_grad_cols == 0:
        return dza, np.zeros((0, p_dim))

    w_max = max(np.abs(w).max(), 1e-30)
    w_rel = w / w_max
    n_grad_tiles = _ceil_div(n_grad_cols, TILE)
    count, per = backward_splits(n_grad_cols, na, p_dim, multiprocessors, blocks_per_sm)
    acc_cols = np.zeros((count, n_grad_tiles * TILE, dim_pad))
    for bx in range(n_grad_tiles):
        col0 = bx * TILE
        for by in range(count):
            for t in range(by * per, min(by * per + per, n_anchor_tiles)):
                row0 = t * TILE
                idx = row0 + np.arange(TILE)
                lse_vec = np.where(idx < na, np.pad(lse, (0, TILE))[idx], 0.0)
                w_vec = np.where(idx < na, np.pad(w_rel, (0, TILE))[idx], 0.0)
                s = a_pad[row0:row0 + TILE] @ c_pad[col0:col0 + TILE].T
                g = _legacy_probabilities(s, row0, col0, na, nc, self_offset, scale, lse_vec,
                                          w_vec, fp16)
                acc_cols[by, col0:col0 + TILE] += g.T @ a_pad[row0:row0 + TILE]
    cols = acc_cols[0] if count == 1 else acc_cols.sum(0)
    return dza, cols[:n_grad_cols, :p_dim] * (w_max * scale * tile_scale)


# ---------------------------------------------------------------------------------------------
# Dense float64 math: what every emulation must equal.
# ---------------------------------------------------------------------------------------------

def dense_scores(za, zc, self_offset, scale):
    s = scale * (za @ zc.T)
    rows = np.arange(za.shape[0])
    cols = rows + self_offset
    keep = (cols >= 0) & (cols < zc.shape[0])
    s[rows[keep], cols[keep]] = -np.inf
    return s


def dense_lse_forward(za, zc, self_offset, scale):
    s = dense_scores(za, zc, self_offset, scale)
    return _logsumexp0(s.T)


def dense_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols):
    prob = np.exp(dense_scores(za, zc, self_offset, scale) - lse[:, None])
    dza = scale * w[:, None] * (prob @ zc)
    dzc = scale * (prob * w[:, None]).T[:n_grad_cols] @ za
    return dza, dzc

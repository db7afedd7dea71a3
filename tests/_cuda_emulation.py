"""Float64 emulations of the CUDA kernels' loop structure (csrc/), for CPU tests.

No GPU has to run for these: each function follows its kernel statement by statement (grid,
split ranges, tile order, masks, left-out pair, lane ownership, merges, workspace slices and the
glue's reduction in csrc/bindings.cpp), with float64 arithmetic in place of the hardware's.
tests/test_cuda_emulation.py compares them with dense float64 math on odd sizes.

The float32 sweep (csrc/sweep_simt.cu) is emulated thread by thread: its zero-filling cp.async
loads into padded shared-memory rows, the steps of 4096 / D swept rows through the same ring
model, each thread's rows, columns and output features, the half-warp shuffles of the
probabilities and the lane merges.

The tensor-core sweep (csrc/sweep_tc.cu) is emulated at fragment level: the XOR-swizzled
shared-memory tiles, ``ldmatrix`` (plain and transposed) and ``mma.m16n8k16`` follow the PTX ISA
fragment layouts, lane by lane, so a wrong address or fragment index in the kernel's formulas
shows up here as a wrong number. Its swept tiles reach the warps through an emulated cp.async
ring (commit / wait_group groups, barriers): a tile read before its copy lands, or a stage
overwritten while a warp may still read it, fails.

The Hopper sweep (csrc/sweep_wgmma.cu) is emulated at warpgroup-fragment level: CuTe's 128-byte
swizzled GMMA shared-memory layout, the wgmma accumulator and register-A fragment layouts of the
PTX ISA, the kernel's views of them (rows and columns of a thread's accumulator, the scores
reused as the A operand), the quad merge and the float2 stores, through the same cp.async ring
model.
"""
from __future__ import annotations

import numpy as np

from clreg_fast.backends.cuda.splits import TILE, backward_splits, forward_splits

THREADS = 128
FP16_PROB_SCALE = 4096.0
LANES = np.arange(32)
G = LANES >> 2  # fragment row
Q = LANES & 3   # fragment column pair


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


def _lane_merge_lse(run_max, run_sum, lanes, masks):
    """The kernels' closing merge of per-lane running (max, sum) pairs: __shfl_xor_sync over
    `masks` (lanes indexes axis 0), then m + log(sum), -inf for a row with nothing counted."""
    m, total = run_max.copy(), run_sum.copy()
    for mask in masks:
        om, os_ = m[lanes ^ mask], total[lanes ^ mask]
        nm = np.maximum(m, om)
        live = nm != -np.inf
        with np.errstate(invalid="ignore"):
            merged = total * np.exp(m - nm) + os_ * np.exp(om - nm)
        total = np.where(live, merged, total)
        m = np.where(live, nm, m)
    with np.errstate(divide="ignore"):
        return np.where((m == -np.inf) | (total == 0), -np.inf,
                        m + np.log(np.where(total > 0, total, 1.0)))


# ---------------------------------------------------------------------------------------------
# The SIMT / WMMA kernels (lse_forward.cu, lse_backward.cu, tiles.cuh), used for fp32 and for
# feature sizes above 256.
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
# The tensor-core sweep (sweep_tc.cu): fragment-level emulation.
# ---------------------------------------------------------------------------------------------

def sweep_tc_dim(dim):
    """sweep_tc_dim() of sweep_tc.cu: the padded feature size, 0 when the sweep does not apply."""
    return 64 if dim <= 64 else 128 if dim <= 128 else 256 if dim <= 256 else 0


def swz(d, r, k):
    """Element offset of (row r, feature k, a multiple of 8) in a swizzled [64][d] tile."""
    return r * d + (((k >> 3) ^ (r & 7)) << 3)


def load_tile(d, src, row0):
    """load_tile_async: whole padded rows, chunk by chunk, into the swizzled layout."""
    tile = np.full(TILE * d, np.nan)
    chunks = d // 8
    for it in range(TILE * chunks // THREADS):
        e = np.arange(THREADS) + it * THREADS
        r, c = e // chunks, e % chunks
        for j in range(8):
            tile[swz(d, r, c * 8) + j] = src[row0 + r, c * 8 + j]
    assert not np.isnan(tile).any(), "the loader must fill the whole tile"
    return tile


def ldmatrix_x4(tile, addr, trans=False):
    """Four 8 x 8 matrices; lane 8j + i addresses row i of matrix j. Returns regs[4][32][2]:
    plain, lane l holds M_j[l // 4][2 (l % 4) + t]; transposed, M_j[2 (l % 4) + t][l // 4]."""
    regs = np.empty((4, 32, 2))
    for j in range(4):
        mat = np.stack([tile[addr[8 * j + i]: addr[8 * j + i] + 8] for i in range(8)])
        for t in range(2):
            regs[j, :, t] = mat[2 * Q + t, G] if trans else mat[G, 2 * Q + t]
    return regs


def mma_16816(c, a, b0, b1):
    """c[32][4] += A B from the PTX m16n8k16 fragments a[4][32][2], b0/b1[32][2]."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for t in range(2):
        A[G, 2 * Q + t] = a[0, :, t]
        A[G + 8, 2 * Q + t] = a[1, :, t]
        A[G, 8 + 2 * Q + t] = a[2, :, t]
        A[G + 8, 8 + 2 * Q + t] = a[3, :, t]
        B[2 * Q + t, G] = b0[:, t]
        B[8 + 2 * Q + t, G] = b1[:, t]
    C = A @ B
    for t in range(2):
        c[:, t] += C[G, 2 * Q + t]
        c[:, 2 + t] += C[G + 8, 2 * Q + t]


def sweep_stages(d):
    """SweepConfig<D>::kStages: the depth of the cp.async ring."""
    return 3 if d <= 128 else 2


class CpAsyncBlock:
    """The shared memory of one block under cp.async, group by group (PTX ISA, cp.async):
    a copy lands only when a ``cp.async.wait_group`` retires its group, and a ``__syncthreads``
    orders the warps. Reading a buffer whose copy is still in flight, or issuing a copy into a
    buffer that a warp may still read (no barrier since its last read), is an AssertionError.
    """

    def __init__(self):
        self.smem = {}
        self.groups = []    # committed groups, oldest first: lists of (buffer, value)
        self.open = []      # copies issued since the last commit
        self.epoch = 0      # __syncthreads count
        self.last_read = {}  # buffer -> epoch of its last read

    def copy(self, buf, value):
        assert self.last_read.get(buf, -1) < self.epoch, (
            f"copy into {buf!r} without a barrier after its last read: another warp may still "
            "read it")
        self.open.append((buf, value))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait_group(self, n):
        while len(self.groups) > n:
            for buf, value in self.groups.pop(0):
                self.smem[buf] = value

    def syncthreads(self):
        self.epoch += 1

    def in_flight(self, buf):
        return any(b == buf for g in self.groups + [self.open] for b, _ in g)

    def read(self, buf):
        assert not self.in_flight(buf), f"{buf!r} is read while a copy into it is in flight"
        assert buf in self.smem, f"{buf!r} is read before any copy landed"
        self.last_read[buf] = self.epoch
        return self.smem[buf]


def sweep_ring(n_tiles, stages, load, *, wait_n=None, ahead=None, load_before_barrier=False):
    """The prologue and main loop of sweep_tc_kernel as the block's shared memory sees them:
    returns the swept stage contents read in iterations 0..n_tiles-1 (each asserted to be the
    tile of that iteration) and checks every read and every copy against CpAsyncBlock.
    ``load(tile)`` gives a stage's contents. ``wait_n``, ``ahead`` and ``load_before_barrier``
    are the kernel's choices (kStages - 2, kStages - 1, False); other values are there so the
    tests can show that the model catches a wrong schedule."""
    wait_n = stages - 2 if wait_n is None else wait_n
    ahead = stages - 1 if ahead is None else ahead
    blk = CpAsyncBlock()
    blk.copy("own", "own")  # the owned tile: group 0
    blk.commit()
    for st in range(stages - 1):
        if st < n_tiles:
            blk.copy(("stage", st), (st, load(st)))
        blk.commit()  # committed even when empty
    reads = []

    def issue(it):
        nxt = it + ahead
        if nxt < n_tiles:
            blk.copy(("stage", nxt % stages), (nxt, load(nxt)))
        blk.commit()

    for it in range(n_tiles):
        blk.wait_group(wait_n)
        if load_before_barrier:
            issue(it)
        blk.syncthreads()
        if not load_before_barrier:
            issue(it)
        assert blk.read("own") == "own"
        tile, value = blk.read(("stage", it % stages))
        assert tile == it, f"iteration {it} reads tile {tile}"
        reads.append(value)
    # cp_async_wait<0> at the end retires the rest: after at least one iteration only empty
    # groups are left (with no tile at all, which the split policy never launches, the owned
    # tile's copy is, and the wait covers it).
    if n_tiles:
        assert not any(blk.groups) and not blk.open, "a copy outlives the loop"
    blk.wait_group(0)
    assert not blk.groups
    return reads


def load_vectors(lse, w, row0):
    """load_vectors_async: threads 0-15 copy lse[row0 + 4c ..], threads 16-31 w[row0 + 4c ..],
    four floats each, to vec[4c] and vec[64 + 4c] (c = thread & 15)."""
    vec = np.full(2 * TILE, np.nan)
    for t in range(32):
        c = t & 15
        src = lse if t < 16 else w
        dst = (0 if t < 16 else TILE) + 4 * c
        vec[dst:dst + 4] = src[row0 + 4 * c: row0 + 4 * c + 4]
    assert not np.isnan(vec).any(), "lse / w must be padded to whole tiles"
    return vec


def _score_fragments(d, nb_count, own_tile, swept_tile, warp_row0, n0):
    s = np.zeros((nb_count, 32, 4))
    for kk in range(d // 16):
        a = ldmatrix_x4(own_tile, swz(d, warp_row0 + (LANES & 15), kk * 16 + 8 * (LANES >> 4)))
        for np_ in range(nb_count // 2):
            b = ldmatrix_x4(swept_tile, swz(d, n0 + np_ * 16 + (LANES & 7) + 8 * (LANES >> 4),
                                            kk * 16 + 8 * ((LANES >> 3) & 1)))
            mma_16816(s[2 * np_], a, b[0], b[1])
            mma_16816(s[2 * np_ + 1], a, b[2], b[3])
    return s


def sweep_tc_kernel(mode, own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset, scale,
                    fixed_shift, d, n_splits, tiles_per_split, fp16=False):
    """sweep_tc_kernel<T, D, M> over its whole grid, writing `out` as the kernel does."""
    steps_per_tile = 1 if mode == "forward" else TILE // (16 if d == 256 else 64)
    nb_count = 8 if mode == "forward" else (16 if d == 256 else 64) // 8
    n_swept_tiles = _ceil_div(n_swept, TILE)
    for bx in range(_ceil_div(n_own, TILE)):
        own0 = bx * TILE
        own_tile = load_tile(d, own, own0)
        for by in range(n_splits):
            tile_begin = by * tiles_per_split
            tile_end = min(tile_begin + tiles_per_split, n_swept_tiles)

            def load(i, tile_begin=tile_begin):  # load_stage: the swept tile (and vectors)
                t = tile_begin + i
                vec = load_vectors(lse, w, t * TILE) if mode == "cols" else None
                return load_tile(d, swept, t * TILE), vec

            staged = sweep_ring(tile_end - tile_begin, sweep_stages(d), load)
            for warp in range(4):
                warp_row0 = warp * 16
                own_row = [own0 + warp_row0 + G + 8 * h for h in range(2)]
                own_ok = [r < n_own for r in own_row]
                lse_own = [np.array([lse[r] if (mode == "rows" and r < n_own) else 0.0
                                     for r in own_row[h]]) for h in range(2)]
                run_max = [np.full(32, scale if fixed_shift else -np.inf) for _ in range(2)]
                run_sum = [np.zeros(32) for _ in range(2)]
                acc = np.zeros((d // 8, 32, 4))
                for tile in range(tile_begin, tile_end):
                    swept_tile, vec = staged[tile - tile_begin]  # through the cp.async ring
                    sw0 = tile * TILE
                    n_valid = min(TILE, n_swept - sw0)
                    diag = []
                    for h in range(2):
                        dd = own_row[h] + pair_offset - sw0
                        diag.append(np.where((dd < 0) | (dd >= TILE), -1, dd))
                    for step in range(steps_per_tile):
                        n0 = step * nb_count * 8
                        s = _score_fragments(d, nb_count, own_tile, swept_tile, warp_row0, n0)
                        if mode == "forward":
                            for h in range(2):
                                x = np.empty((nb_count, 32, 2))
                                for nb in range(nb_count):
                                    for j in range(2):
                                        col = n0 + 8 * nb + 2 * Q + j
                                        ok = (col < n_valid) & (col != diag[h])
                                        x[nb, :, j] = np.where(ok, scale * s[nb, :, 2 * h + j],
                                                               -np.inf)
                                if not fixed_shift:
                                    tile_max = x.max(axis=(0, 2))
                                    grow = tile_max > run_max[h]
                                    with np.errstate(invalid="ignore"):
                                        run_sum[h] = np.where(
                                            grow, run_sum[h] * np.exp(run_max[h] - tile_max),
                                            run_sum[h])
                                    run_max[h] = np.where(grow, tile_max, run_max[h])
                                live = run_max[h] != -np.inf
                                with np.errstate(invalid="ignore"):
                                    add = np.exp(x - run_max[h][None, :, None]).sum(axis=(0, 2))
                                run_sum[h] = np.where(live, run_sum[h] + add, run_sum[h])
                        else:
                            for nb in range(nb_count):
                                for e in range(4):
                                    h = e >> 1
                                    col = n0 + 8 * nb + 2 * Q + (e & 1)
                                    ok = own_ok[h] & (col < n_valid) & (col != diag[h])
                                    with np.errstate(over="ignore", invalid="ignore"):
                                        if mode == "rows":
                                            p = np.exp(scale * s[nb, :, e] - lse_own[h])
                                        else:
                                            p = vec[TILE + col] * np.exp(scale * s[nb, :, e]
                                                                         - vec[col])
                                    if fp16:
                                        p = p * FP16_PROB_SCALE
                                    s[nb, :, e] = np.where(ok, p, 0.0)
                            for kk in range(nb_count // 2):
                                a = np.empty((4, 32, 2))
                                a[0] = s[2 * kk][:, 0:2]
                                a[1] = s[2 * kk][:, 2:4]
                                a[2] = s[2 * kk + 1][:, 0:2]
                                a[3] = s[2 * kk + 1][:, 2:4]
                                for np_ in range(d // 16):
                                    b = ldmatrix_x4(swept_tile, swz(
                                        d, n0 + kk * 16 + (LANES & 7) + 8 * ((LANES >> 3) & 1),
                                        np_ * 16 + 8 * (LANES >> 4)), trans=True)
                                    mma_16816(acc[2 * np_], a, b[0], b[1])
                                    mma_16816(acc[2 * np_ + 1], a, b[2], b[3])
                if mode == "forward":
                    for h in range(2):
                        val = _lane_merge_lse(run_max[h], run_sum[h], LANES, (1, 2))
                        write = (Q == 0) & own_ok[h]
                        out[by, own_row[h][write]] = val[write]
                else:
                    base = by * _round_up(n_own, TILE)
                    for nd in range(d // 8):
                        if 8 * nd < ld_out:
                            for h in range(2):
                                for t in range(2):
                                    out[base + own_row[h], 8 * nd + 2 * Q + t] = acc[nd, :, 2 * h + t]


def tc_lse_forward(za, zc, self_offset, scale, fixed_shift, multiprocessors, blocks_per_sm,
                   kernel=None):
    """bindings.cpp lse_forward on the tensor-core path (kernel: sweep_tc_kernel, or the
    wgmma sweep's emulation, which has the same arguments)."""
    kernel = kernel or sweep_tc_kernel
    na, nc, dim = za.shape[0], zc.shape[0], za.shape[1]
    d = sweep_tc_dim(dim)
    own = _padded(za, _round_up(na, TILE), d)
    swept = _padded(zc, _round_up(nc, TILE), d)
    count, per = forward_splits(na, nc, multiprocessors, blocks_per_sm)
    partial = np.full((count, na), np.nan)
    kernel("forward", own, swept, None, None, partial, na, nc, 0, self_offset, scale,
           fixed_shift, d, count, per)
    return partial[0] if count == 1 else _logsumexp0(partial)


def tc_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, fp16, multiprocessors,
                    blocks_per_sm, kernel=None):
    """bindings.cpp lse_backward on the tensor-core path (kernel: as in tc_lse_forward)."""
    kernel = kernel or sweep_tc_kernel
    na, nc, p_dim = za.shape[0], zc.shape[0], za.shape[1]
    d = sweep_tc_dim(p_dim)
    ld_out = _round_up(p_dim, TILE)
    a_pad = _padded(za, _round_up(na, TILE), d)
    c_pad = _padded(zc, _round_up(nc, TILE), d)
    tile_scale = 1.0 / FP16_PROB_SCALE if fp16 else 1.0

    count, per = backward_splits(na, nc, p_dim, multiprocessors, blocks_per_sm)
    acc_rows = np.full((count * _round_up(na, TILE), ld_out), np.nan)  # torch::empty
    kernel("rows", a_pad, c_pad, lse, None, acc_rows, na, nc, ld_out, self_offset,
           scale, False, d, count, per, fp16)
    acc_rows = acc_rows.reshape(count, _round_up(na, TILE), ld_out)
    assert not np.isnan(acc_rows).any(), "every element of every slice is written"
    rows = acc_rows[0] if count == 1 else acc_rows.sum(0)
    dza = rows[:na, :p_dim] * (w * (scale * tile_scale))[:, None]
    if n_grad_cols == 0:
        return dza, np.zeros((0, p_dim))

    w_max = max(np.abs(w).max(), 1e-30)
    lse_pad = np.pad(lse, (0, _round_up(na, TILE) - na))
    w_pad = np.pad(w / w_max, (0, _round_up(na, TILE) - na))
    count, per = backward_splits(n_grad_cols, na, p_dim, multiprocessors, blocks_per_sm)
    acc_cols = np.full((count * _round_up(n_grad_cols, TILE), ld_out), np.nan)
    kernel("cols", c_pad, a_pad, lse_pad, w_pad, acc_cols, n_grad_cols, na, ld_out,
           -self_offset, scale, False, d, count, per, fp16)
    acc_cols = acc_cols.reshape(count, _round_up(n_grad_cols, TILE), ld_out)
    assert not np.isnan(acc_cols).any(), "every element of every slice is written"
    cols = acc_cols[0] if count == 1 else acc_cols.sum(0)
    return dza, cols[:n_grad_cols, :p_dim] * (w_max * scale * tile_scale)


# ---------------------------------------------------------------------------------------------
# The Hopper sweep (sweep_wgmma.cu): one warpgroup per block, wgmma fragments.
# ---------------------------------------------------------------------------------------------
# Register fragments follow the PTX ISA ("wgmma .m64nNk16": register fragments of the
# accumulator D and of a register A); the kernel's CuTe views of them (rows_cols, scores_as_a)
# are emulated as the value-index formulas they produce for CuTe's fragment layout
# ((2, 2, N / 8)) : ((1, 2, 4)). Shared memory follows CuTe's K-major 128-byte-swizzle GMMA
# layout (GMMA::Layout_K_SW128_Atom tiled to 64 x D); the wgmma itself is dense math on the
# matrices read through those layouts.

WG_THREADS = np.arange(THREADS)
WG_WARP = WG_THREADS >> 5
WG_G = (WG_THREADS & 31) >> 2
WG_Q = WG_THREADS & 3


def wgmma_stages(d):
    """WgmmaConfig<D>::kStages."""
    return 2 if d == 256 else 3


def wgmma_smem_bytes(d):
    """WgmmaConfig<D>::kSmemBytes: alignment slack, owned tile, ring, lse / w_rel vectors."""
    return 1024 + TILE * d * 2 * (1 + wgmma_stages(d)) + 2 * TILE * 4 * wgmma_stages(d)


def sw128_offset(d, r, k):
    """Element offset of (row r, feature k) in a 64 x d 16-bit tile of CuTe's
    tile_to_shape(Layout_K_SW128_Atom, (64, d)): 8 x 64 atoms (1 KB), rows first, then feature
    blocks; inside an atom the 16-byte chunk k / 8 is XOR-ed with the row r % 8."""
    r, k = np.asarray(r), np.asarray(k)
    atom = (r >> 3) + (TILE // 8) * (k >> 6)
    inner = (r & 7) * 64 + ((((k & 63) >> 3) ^ (r & 7)) << 3) + (k & 7)
    return atom * 512 + inner


def wgmma_load_tile(d, src, row0):
    """The kernel's tiled copy (128 threads as 16 x 8, 8 elements each, 16 rows x 64 features
    per step) into the swizzled layout; every element exactly once."""
    tile = np.full(TILE * d, np.nan)
    written = np.zeros(TILE * d, dtype=int)
    for rr in range(TILE // 16):
        for kk in range(d // 64):
            r = rr * 16 + (WG_THREADS >> 3)
            k0 = kk * 64 + 8 * (WG_THREADS & 7)
            for j in range(8):
                off = sw128_offset(d, r, k0 + j)
                tile[off] = src[row0 + r, k0 + j]
                written[off] += 1
    assert (written == 1).all(), "the copy must write each element of the tile once"
    return tile


def wgmma_tile_matrix(d, tile, transposed=False):
    """The 64 x d matrix a wgmma descriptor reads from `tile`; transposed: the d x 64 MN-major
    view (element (k, n) of RingT is element (n, k) of Ring)."""
    r, k = np.meshgrid(np.arange(TILE), np.arange(d), indexing="ij")
    mat = tile[sw128_offset(d, r, k)]
    return mat.T if transposed else mat


def wgmma_acc_coords(n):
    """(row, column) of accumulator value v of each thread of an m64nN wgmma: (128, n / 2)."""
    v = np.arange(n // 2)
    row = 16 * WG_WARP[:, None] + WG_G[:, None] + 8 * ((v[None, :] >> 1) & 1)
    col = 8 * (v[None, :] >> 2) + 2 * WG_Q[:, None] + (v[None, :] & 1)
    return row, col


def rows_cols_value(m, n):
    """rows_cols(): value index of (row m in {0, 1}, column n) of a thread's accumulator view."""
    return (n & 1) + 2 * m + 4 * (n >> 1)


def scores_as_a_value(kb, i):
    """scores_as_a(): value index of element i of k block kb of the RS A operand."""
    return i + 8 * kb


def wgmma_a_coords(kb):
    """(row, k) of element i = (k pair, row half, k half) of k block kb of a register A
    operand (m64k16): (128, 8)."""
    i = np.arange(8)
    row = 16 * WG_WARP[:, None] + WG_G[:, None] + 8 * ((i[None, :] >> 1) & 1)
    k = 16 * kb + 8 * (i[None, :] >> 2) + 2 * WG_Q[:, None] + (i[None, :] & 1)
    return row, k


def gmma_desc_addresses(desc, major, mn):
    """Byte addresses in shared memory of the (mn x 16) 16-bit operand that one wgmma reads
    through a descriptor, decoded with the PTX ISA's canonical 128-byte-swizzle layouts (in
    16-byte units T): K-major ((8, m), (T, 2)) : ((8T, SBO), (1, T)), MN-major
    ((T, 8, m), (8, 2)) : ((1, T, LBO), (8T, SBO)); the swizzle XORs address bits [4, 7) with
    bits [7, 10). desc: dict of start, lbo, sbo (bytes), base_offset, layout_type."""
    assert desc["layout_type"] == 1, "SWIZZLE_128B (the only layout the kernel uses)"
    assert desc["base_offset"] == 0, "the tiles are 1024-byte aligned"
    i, j = np.meshgrid(np.arange(mn), np.arange(16), indexing="ij")  # (mn index, k index)
    if major == "K":
        addr = desc["start"] + 128 * (i & 7) + desc["sbo"] * (i >> 3) + 2 * j
    else:
        addr = (desc["start"] + 2 * (i & 63) + desc["lbo"] * (i >> 6) + 128 * (j & 7)
                + desc["sbo"] * (j >> 3))
    return addr ^ (((addr >> 7) & 7) << 4)


def wgmma_operand_addresses(operand, d, stage, kb):
    """Byte addresses where the kernel's operand tile keeps element (mn, k) of k block kb
    (the same shape as gmma_desc_addresses): scores_a = owned tile (row, feature), scores_b =
    ring stage (swept row, feature), product_b = ring stage read as (feature, swept row)."""
    tile_bytes = TILE * d * 2
    if operand == "scores_a":
        i, j = np.meshgrid(np.arange(TILE), 16 * kb + np.arange(16), indexing="ij")
        return 2 * sw128_offset(d, i, j)
    if operand == "scores_b":
        i, j = np.meshgrid(np.arange(TILE), 16 * kb + np.arange(16), indexing="ij")
        return stage * tile_bytes + 2 * sw128_offset(d, i, j)
    assert operand == "product_b"
    i, j = np.meshgrid(np.arange(d), 16 * kb + np.arange(16), indexing="ij")
    return stage * tile_bytes + 2 * sw128_offset(d, j, i)


def wgmma_ss(a_mat, b_mat, n):
    """SS wgmma, 64 x n accumulator (zero-initialised) as fragments (128, n / 2)."""
    row, col = wgmma_acc_coords(n)
    return (a_mat @ b_mat.T)[row, col]


def wgmma_rs(acc, a_frag, b_mat):
    """acc (128, n / 2) += A (64 x 64, from register fragments a_frag (128, 32)) . b_mat
    (64 x n)."""
    n = b_mat.shape[1]
    A = np.full((TILE, TILE), np.nan)
    for kb in range(TILE // 16):
        row, k = wgmma_a_coords(kb)
        vals = a_frag[:, scores_as_a_value(kb, np.arange(8))]
        assert np.isnan(A[row, k]).all(), "an A element is given twice"
        A[row, k] = vals
    assert not np.isnan(A).any(), "every A element comes from a register"
    row, col = wgmma_acc_coords(n)
    return acc + (A @ b_mat)[row, col]


def sweep_wgmma_kernel(mode, own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset,
                       scale, fixed_shift, d, n_splits, tiles_per_split, fp16=False):
    """sweep_wgmma_kernel<T, D, M> over its whole grid, writing `out` as the kernel does."""
    n_swept_tiles = _ceil_div(n_swept, TILE)
    row_s, col_s = wgmma_acc_coords(TILE)
    # The thread's view (rows m, columns n) of the score accumulator, and its coordinates.
    m_idx = np.arange(2)[:, None]
    n_idx = np.arange(TILE // 4)[None, :]
    view = rows_cols_value(m_idx, n_idx)  # (2, 16) value indices
    assert sorted(view.ravel()) == list(range(TILE // 2)), "rows_cols covers every value once"
    rows_rc, cols_rc = row_s[:, view], col_s[:, view]  # (128, 2, 16)
    assert (rows_rc == rows_rc[:, :, :1]).all(), "a view row is one matrix row"
    for bx in range(_ceil_div(n_own, TILE)):
        own0 = bx * TILE
        own_mat = wgmma_tile_matrix(d, wgmma_load_tile(d, own, own0))
        own_row = own0 + rows_rc[:, :, 0]  # (128, 2)
        own_ok = own_row < n_own
        lse_own = np.zeros((THREADS, 2))
        if mode == "rows":
            lse_own[own_ok] = lse[own_row[own_ok]]
        for by in range(n_splits):
            tile_begin = by * tiles_per_split
            tile_end = min(tile_begin + tiles_per_split, n_swept_tiles)

            def load(i, tile_begin=tile_begin):  # load_stage: the swept tile (and vectors)
                t = tile_begin + i
                vec = load_vectors(lse, w, t * TILE) if mode == "cols" else None
                return wgmma_load_tile(d, swept, t * TILE), vec

            staged = sweep_ring(tile_end - tile_begin, wgmma_stages(d), load)
            run_max = np.full((THREADS, 2), scale if fixed_shift else -np.inf)
            run_sum = np.zeros((THREADS, 2))
            acc = np.zeros((THREADS, d // 2))
            for tile in range(tile_begin, tile_end):
                swept_tile, vec = staged[tile - tile_begin]  # through the cp.async ring
                sw0 = tile * TILE
                n_valid = min(TILE, n_swept - sw0)
                dd = own_row + pair_offset - sw0
                diag = np.where((dd < 0) | (dd >= TILE), -1, dd)  # (128, 2)
                s = wgmma_ss(own_mat, wgmma_tile_matrix(d, swept_tile), TILE)
                ok = (cols_rc < n_valid) & (cols_rc != diag[:, :, None])
                s_rc = s[:, view]  # (128, 2, 16)
                if mode == "forward":
                    x = np.where(ok, scale * s_rc, -np.inf)
                    if not fixed_shift:
                        tile_max = x.max(axis=2)
                        grow = tile_max > run_max
                        with np.errstate(invalid="ignore"):
                            run_sum = np.where(grow, run_sum * np.exp(run_max - tile_max), run_sum)
                        run_max = np.where(grow, tile_max, run_max)
                    live = run_max != -np.inf
                    with np.errstate(invalid="ignore"):
                        add = np.exp(x - run_max[:, :, None]).sum(axis=2)
                    run_sum = np.where(live, run_sum + add, run_sum)
                else:
                    with np.errstate(over="ignore", invalid="ignore"):
                        if mode == "rows":
                            p = np.exp(scale * s_rc - lse_own[:, :, None])
                        else:
                            p = vec[TILE + cols_rc] * np.exp(scale * s_rc - vec[cols_rc])
                    if fp16:
                        p = p * FP16_PROB_SCALE
                    p = np.where(ok & own_ok[:, :, None], p, 0.0)
                    probs = np.empty((THREADS, TILE // 2))
                    probs[:, view] = p  # probs_rc(m, n) = ...
                    acc = wgmma_rs(acc, probs, wgmma_tile_matrix(d, swept_tile, transposed=True).T)
            if mode == "forward":
                # Lanes 4g..4g+3 of a warp share a row: xor 1 and 2 stay inside the quad.
                assert (row_s[WG_THREADS ^ 1] == row_s).all() and (row_s[WG_THREADS ^ 2] == row_s).all()
                val = _lane_merge_lse(run_max, run_sum, WG_THREADS, (1, 2))
                write = (WG_Q[:, None] == 0) & own_ok
                out[by, own_row[write]] = val[write]
            else:
                row_o, col_o = wgmma_acc_coords(d)
                view_o = rows_cols_value(np.arange(2)[:, None], np.arange(d // 4)[None, :])
                base = by * _round_up(n_own, TILE)
                for mm in range(2):
                    for nn in range(0, d // 4, 2):
                        v0, v1 = view_o[mm, nn], view_o[mm, nn + 1]
                        row, col = row_o[:, v0], col_o[:, v0]
                        assert (row_o[:, v1] == row).all() and (col_o[:, v1] == col + 1).all(), (
                            "a float2 store needs adjacent columns")
                        keep = col < ld_out
                        out[base + own0 + row[keep], col[keep]] = acc[keep, v0]
                        out[base + own0 + row[keep], col[keep] + 1] = acc[keep, v1]


def wgmma_lse_forward(za, zc, self_offset, scale, fixed_shift, multiprocessors, blocks_per_sm):
    """bindings.cpp lse_forward on the wgmma path (the glue is the tensor-core path's)."""
    return tc_lse_forward(za, zc, self_offset, scale, fixed_shift, multiprocessors,
                          blocks_per_sm, kernel=sweep_wgmma_kernel)


def wgmma_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, fp16, multiprocessors,
                       blocks_per_sm):
    """bindings.cpp lse_backward on the wgmma path."""
    return tc_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, fp16,
                           multiprocessors, blocks_per_sm, kernel=sweep_wgmma_kernel)


# ---------------------------------------------------------------------------------------------
# The float32 sweep (sweep_simt.cu): thread-level emulation.
# ---------------------------------------------------------------------------------------------

THREAD = np.arange(THREADS)
TX = THREAD & 15  # swept column / output feature lane
TY = THREAD >> 4  # owned row group: rows TY + 8 i


def simt_config(d):
    """SimtConfig<D>: (rows per step, shared-memory row stride, ring depth)."""
    assert d in (64, 128, 256)
    return 4096 // d, d + 4, 2 if d == 256 else 3


def simt_operand_layout(dim, address):
    """simt_operand() of bindings.cpp and the row stride the glue then passes to
    launch_sweep_simt (the result's size(1), never its stride(0)), for a contiguous float32
    tensor of `dim` features whose first element is at byte `address`: (copied, ld). A copy
    has rows zero-padded to round_up(dim, 4) floats. size(1) is the rows' distance in any
    contiguous tensor of several rows; with one row, stride(0) may be anything (unused)."""
    if dim % 4 == 0 and address % 16 == 0:
        return False, dim
    return True, _round_up(dim, 4)


def simt_operand(z, address=0):
    """simt_operand() of bindings.cpp on the emulated array z (its strides those of the tensor;
    first element at byte `address`, 16-byte aligned unless told): returns (z or its padded
    copy, the ld the launch is given). The loads read z's memory as its strides lay it out
    (simt_memory), so a wrong ld reads the wrong floats."""
    copied, ld = simt_operand_layout(z.shape[1], address)
    if not copied:
        return z, ld
    out = np.zeros((z.shape[0], _round_up(z.shape[1], 4)))
    out[:, : z.shape[1]] = z
    return out, ld


def simt_memory(z):
    """The memory a kernel sees from z's first element on, by offset in floats: its elements
    where z's strides put them, NaN where z has none (a gap between rows, or past the end)."""
    assert min(z.strides, default=0) >= 0
    s0, s1 = (st // z.itemsize for st in z.strides)
    off = np.arange(z.shape[0])[:, None] * s0 + np.arange(z.shape[1])[None, :] * s1
    mem = np.full(off.max() + 1 if off.size else 0, np.nan)
    mem[off] = z
    return mem


def simt_launch_check(own_ld, own_address, swept_ld, swept_address, dim, d, ld_out):
    """The argument checks of launch_sweep_simt: cudaErrorInvalidValue (here a ValueError)
    unless rows are whole 16-byte chunks at 16-byte aligned bases and hold `dim` features."""
    aligned = (own_ld % 4 == 0 and swept_ld % 4 == 0 and own_address % 16 == 0
               and swept_address % 16 == 0)
    if (d not in (64, 128, 256) or dim > d or dim > own_ld or dim > swept_ld or not aligned
            or ld_out > d):
        raise ValueError("launch_sweep_simt: cudaErrorInvalidValue")


def simt_load_rows(d, n_tile_rows, mem, ld, row0, n_rows, dim):
    """load_rows_async<D, ROWS>: 16-byte cp.async chunks with src-size zero fill, into rows
    D + 4 floats apart, from the operand's memory `mem` (simt_memory) with rows `ld` floats
    apart. The 4 pad floats of every row stay NaN: a read of them fails the result."""
    _, ld_smem, _ = simt_config(d)
    chunks = d // 4
    flat = mem
    dst = np.full(n_tile_rows * ld_smem, np.nan)
    written = np.zeros(n_tile_rows * ld_smem, bool)
    for it in range(n_tile_rows * chunks // THREADS):
        e = THREAD + it * THREADS
        r, c = e // chunks, e % chunks
        row = row0 + r
        nbytes = np.where(row < n_rows, np.clip(4 * (dim - 4 * c), 0, 16), 0)
        base = r * ld_smem + 4 * c
        assert len(set(base)) == THREADS, "two threads copy into one chunk"
        src0 = row * ld + 4 * c
        assert (src0[nbytes > 0] % 4 == 0).all(), "a 16-byte copy from an unaligned address"
        for t in range(4):  # float t of each thread's chunk
            assert not written[base + t].any(), "two copies into one chunk"
            written[base + t] = True
            take = 4 * t < nbytes  # bytes past src-size are zero-filled, not read
            src_idx = row * ld + 4 * c + t
            assert (4 * c[take] + t < ld).all(), "a copy reads past the end of its row"
            assert (src_idx[take] < flat.shape[0]).all() and \
                not np.isnan(flat[src_idx[take]]).any(), "a copy reads memory outside the operand"
            dst[base + t] = np.where(take, flat[np.where(take, src_idx, 0)], 0.0)
    assert all(written[r * ld_smem: r * ld_smem + d].all() for r in range(n_tile_rows)), \
        "the loader must fill every feature of every row"
    return dst


def simt_load_vectors(rows, lse, w, row0):
    """load_vectors_async<R>: threads t < R / 4 copy lse[row0 + 4t ..], the next R / 4 threads
    w[row0 + 4c ..] (c = t % (R / 4)), four floats each, to vec[4c] and vec[R + 4c]."""
    q = rows // 4
    vec = np.full(2 * rows, np.nan)
    for t in range(2 * q):
        c = t % q
        src, dst = (lse, 4 * c) if t < q else (w, rows + 4 * c)
        assert row0 + 4 * c + 4 <= src.shape[0], "lse / w must be padded to whole tiles"
        vec[dst:dst + 4] = src[row0 + 4 * c: row0 + 4 * c + 4]
    assert not np.isnan(vec).any()
    return vec


def sweep_simt_kernel(mode, own, ld_own, swept, ld_swept, dim, lse, w, out, n_own, n_swept,
                      ld_out, pair_offset, scale, fixed_shift, d, n_splits, tiles_per_split):
    """sweep_simt_kernel<D, M> over its whole grid, writing `out` as the kernel does; every
    thread of a block at once (arrays over threadIdx)."""
    r_step, ld_smem, stages = simt_config(d)
    nj, n_p = r_step // 16, d // 16
    n_swept_tiles = _ceil_div(n_swept, TILE)
    i8 = np.arange(8)
    own_mem, swept_mem = simt_memory(own), simt_memory(swept)
    for bx in range(_ceil_div(n_own, TILE)):
        own0 = bx * TILE
        own_tile = simt_load_rows(d, TILE, own_mem, ld_own, own0, n_own, dim)
        own_row = own0 + TY[:, None] + 8 * i8[None, :]  # [thread][i]
        own_ok = own_row < n_own
        lse_own = np.zeros((THREADS, 8))
        if mode == "rows":
            lse_own[own_ok] = lse[own_row[own_ok]]
        for by in range(n_splits):
            tile_begin = by * tiles_per_split
            tile_end = min(tile_begin + tiles_per_split, n_swept_tiles)
            swept_begin = tile_begin * TILE
            n_steps = _ceil_div(min(tile_end * TILE, n_swept) - swept_begin, r_step)

            def load(step, swept_begin=swept_begin):  # load_stage
                row0 = swept_begin + step * r_step
                rows = simt_load_rows(d, r_step, swept_mem, ld_swept, row0, n_swept, dim)
                vec = simt_load_vectors(r_step, lse, w, row0) if mode == "cols" else None
                return rows, vec

            staged = sweep_ring(n_steps, stages, load)
            run_max = np.full((THREADS, 8), scale if fixed_shift else -np.inf)
            run_sum = np.zeros((THREADS, 8))
            acc = np.zeros((THREADS, 8, n_p))
            kf = np.arange(d)
            a_idx = (TY[:, None, None] + 8 * i8[None, :, None]) * ld_smem + kf[None, None, :]
            b_idx = (TX[:, None, None] + 16 * np.arange(nj)[None, :, None]) * ld_smem + kf
            for it in range(n_steps):
                rows, vec = staged[it]
                sw0 = swept_begin + it * r_step
                n_valid = min(r_step, n_swept - sw0)
                dd = own_row + pair_offset - sw0
                diag = np.where((dd < 0) | (dd >= r_step), -1, dd)  # [thread][i]
                # s[t][i][j] = own row (ty + 8 i) . swept row (tx + 16 j)
                s = np.einsum("tik,tjk->tij", own_tile[a_idx], rows[b_idx])
                col = TX[:, None, None] + 16 * np.arange(nj)[None, None, :]  # [t][1][j]
                ok = (col < n_valid) & (col != diag[:, :, None])
                if mode == "forward":
                    x = np.where(ok, scale * s, -np.inf)
                    if not fixed_shift:
                        step_max = x.max(axis=2)
                        grow = step_max > run_max
                        with np.errstate(invalid="ignore"):
                            run_sum = np.where(grow, run_sum * np.exp(run_max - step_max), run_sum)
                        run_max = np.where(grow, step_max, run_max)
                    live = run_max != -np.inf
                    with np.errstate(invalid="ignore"):
                        add = np.exp(x - run_max[:, :, None]).sum(axis=2)
                    run_sum = np.where(live, run_sum + add, run_sum)
                    continue
                ok = ok & own_ok[:, :, None]
                with np.errstate(over="ignore", invalid="ignore"):
                    if mode == "rows":
                        p = np.exp(scale * s - lse_own[:, :, None])
                    else:
                        p = vec[r_step + col] * np.exp(scale * s - vec[col])
                s = np.where(ok, p, 0.0)
                for j in range(nj):
                    for kx in range(16):
                        k = kx + 16 * j
                        # __shfl_sync(full, s[i][j], kx, 16): lane kx of this half-warp
                        pk = s[(THREAD & ~15) | kx, :, j]  # [t][i]
                        b = rows[k * ld_smem + TX[:, None] + 16 * np.arange(n_p)[None, :]]
                        acc += pk[:, :, None] * b[:, None, :]
            if mode == "forward":
                # __shfl_xor_sync within the half-warp
                val = _lane_merge_lse(run_max, run_sum, THREAD, (1, 2, 4, 8))
                write = (TX[:, None] == 0) & own_ok
                out[by, own_row[write]] = val[write]
            else:
                base = by * _round_up(n_own, TILE)
                for p_ in range(n_p):
                    col = TX + 16 * p_
                    keep = col < ld_out
                    for i in range(8):
                        out[base + own_row[keep, i], col[keep]] = acc[keep, i, p_]


def torch_contiguous(z):
    """Tensor.contiguous() on the emulated array: z itself when torch counts it contiguous
    (strides of size-1 dimensions do not count, so a one-row tensor keeps any row stride),
    else a row-major copy."""
    expected = z.itemsize
    for size, stride in zip(reversed(z.shape), reversed(z.strides)):
        if size != 1:
            if stride != expected:
                return np.ascontiguousarray(z)
            expected *= size
    return z


def _simt_operands(za, zc, dim, ld_out):
    """The float32 sweep's operands as bindings.cpp makes them (contiguous(), simt_operand()),
    checked as launch_sweep_simt checks them (the emulated arrays start 16-byte aligned)."""
    za_s, ld_a = simt_operand(torch_contiguous(za))
    zc_s, ld_c = simt_operand(torch_contiguous(zc))
    simt_launch_check(ld_a, 0, ld_c, 0, dim, sweep_tc_dim(dim), ld_out)
    return za_s, ld_a, zc_s, ld_c


def simt_lse_forward(za, zc, self_offset, scale, fixed_shift, multiprocessors, blocks_per_sm):
    """bindings.cpp lse_forward on the float32 sweep."""
    na, nc, dim = za.shape[0], zc.shape[0], za.shape[1]
    d = sweep_tc_dim(dim)
    own, ld_own, swept, ld_swept = _simt_operands(za, zc, dim, 0)
    count, per = forward_splits(na, nc, multiprocessors, blocks_per_sm)
    partial = np.full((count, na), np.nan)
    sweep_simt_kernel("forward", own, ld_own, swept, ld_swept, dim, None, None, partial, na, nc,
                      0, self_offset, scale, fixed_shift, d, count, per)
    assert not np.isnan(partial).any(), "every partial log-sum-exp is written"
    return partial[0] if count == 1 else _logsumexp0(partial)


def simt_lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, multiprocessors,
                      blocks_per_sm):
    """bindings.cpp lse_backward on the float32 sweep."""
    na, nc, p_dim = za.shape[0], zc.shape[0], za.shape[1]
    d = sweep_tc_dim(p_dim)
    ld_out = _round_up(p_dim, TILE)
    za_s, ld_a, zc_s, ld_c = _simt_operands(za, zc, p_dim, ld_out)

    count, per = backward_splits(na, nc, p_dim, multiprocessors, blocks_per_sm)
    acc_rows = np.full((count * _round_up(na, TILE), ld_out), np.nan)  # torch::empty
    sweep_simt_kernel("rows", za_s, ld_a, zc_s, ld_c, p_dim, lse, None, acc_rows, na, nc, ld_out,
                      self_offset, scale, False, d, count, per)
    acc_rows = acc_rows.reshape(count, _round_up(na, TILE), ld_out)
    assert not np.isnan(acc_rows).any(), "every element of every slice is written"
    rows = acc_rows[0] if count == 1 else acc_rows.sum(0)
    dza = rows[:na, :p_dim] * (w * scale)[:, None]
    if n_grad_cols == 0:
        return dza, np.zeros((0, p_dim))

    w_max = max(np.abs(w).max(), 1e-30)
    lse_pad = np.pad(lse, (0, _round_up(na, TILE) - na))
    w_pad = np.pad(w / w_max, (0, _round_up(na, TILE) - na))
    count, per = backward_splits(n_grad_cols, na, p_dim, multiprocessors, blocks_per_sm)
    acc_cols = np.full((count * _round_up(n_grad_cols, TILE), ld_out), np.nan)
    sweep_simt_kernel("cols", zc_s, ld_c, za_s, ld_a, p_dim, lse_pad, w_pad, acc_cols,
                      n_grad_cols, na, ld_out, -self_offset, scale, False, d, count, per)
    acc_cols = acc_cols.reshape(count, _round_up(n_grad_cols, TILE), ld_out)
    assert not np.isnan(acc_cols).any(), "every element of every slice is written"
    cols = acc_cols[0] if count == 1 else acc_cols.sum(0)
    return dza, cols[:n_grad_cols, :p_dim] * (w_max * scale)


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

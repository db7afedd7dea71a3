"""Triton kernels of the ``triton`` backend (launched from ``ops.py``).

Conventions shared by every kernel:

* Feature tiles are row-major with a unit column stride (the launchers make inputs contiguous);
  row offsets are int64, so ``row * stride`` cannot overflow at millions of rows.
* ``P`` (the feature width) is covered by tiles of ``BLOCK_P`` columns. ``K_TILES`` is the number
  of such tiles: with ``K_TILES == 1`` a block of rows is loaded once and kept in registers; with
  more, scores are summed over all of P in chunks of ``SCORE_CHUNK`` features and each output
  tile (of the backward) is its own program.
* ``ROUND`` is the dtype of the user's inputs (0 float32, 1 bfloat16, 2 float16), or 3 for
  float32 inputs in TF32 mode. On a GPU the operands of the similarity products are rounded to
  it, so bf16/fp16 products run on tensor cores with float32 accumulation; float32 products use
  ``input_precision="ieee"`` (exact float32 products) and TF32 mode ``input_precision="tf32"``
  (operands keep 10 mantissa bits, tensor cores).
* The backward multiplies probability tiles into the features. Before rounding, a tile holds
  ``Pr`` (row kernel; the anchor weight ``scale * w_i`` is applied to the float32 result) or
  ``Pr * w_i / max|w|`` (column kernel; ``scale * max|w|`` is applied to the result), and for
  fp16 times ``FP16_PROB_SCALE``: weights of 1 / (number of anchors) and probabilities of
  1 / (number of columns) would otherwise leave fp16's range at token scale.
* ``INTERPRET`` is set under ``TRITON_INTERPRET=1``: every ``tl.dot`` then takes float32
  operands (the interpreter's bf16 products are wrong) and the operand rounding of the GPU path
  is emulated, so interpreter tests check the GPU path's arithmetic, not its exact bits: on a GPU
  ``tl.exp``, ``tl.log``, ``tl.sqrt`` and ``/`` compile to approximate instructions (ex2.approx,
  lg2.approx, ...) and products are summed in another order, so GPU results agree with the
  interpreter's to ~1e-6 relative (times the scale ``1 / tau`` for exponentials of scores), not
  bitwise; GPU test tolerances allow that. TF32 rounding is emulated to nearest, which the
  hardware's conversion may not match bit for bit (TF32 tests use a TF32-sized bar).
* Column splits (``pid(1)`` of the forward, ``pid(2)`` of the row backward) cover
  ``cols_per_split`` columns each, a multiple of ``BLOCK_N``: with few anchors against many
  columns the launcher gives each block of anchors several programs. The forward then writes one
  partial log-sum-exp per split (merged by a log-sum-exp), the row backward one partial sum per
  split (added); both at ``split * split_stride`` past the output pointer.
"""
import triton
import triton.language as tl

ROUND_FP32 = 0
ROUND_BF16 = 1
ROUND_FP16 = 2
ROUND_TF32 = 3  # float32 inputs, TF32 tensor-core products (opt-in)

# fp16 probability tiles are stored times 2^12 (Pr <= 1, so at most 4096 < 65504): small
# probabilities (~1 / number of columns) stay normal fp16 numbers instead of flushing to zero.
# The per-anchor weights are applied outside the rounded tile for the same reason.
FP16_PROB_SCALE = tl.constexpr(4096.0)

# Features per step of the score sum when P is tiled (K_TILES > 1).
SCORE_CHUNK = tl.constexpr(64)


@triton.jit
def _dot_operand(x, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """A float32 tile as an operand of ``_dot``: rounded to the inputs' dtype (see module doc)."""
    if ROUND == 1:
        if INTERPRET:
            # The interpreter truncates on a float32 -> bf16 cast; a GPU rounds to nearest even.
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(tl.bfloat16)
    elif ROUND == 2:
        if INTERPRET:
            out = x.to(tl.float16).to(tl.float32)
        else:
            out = x.to(tl.float16)
    elif ROUND == 3:
        if INTERPRET:
            # TF32 keeps 10 of float32's 23 mantissa bits: round the low 13 to nearest even.
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x  # the tensor cores read only the TF32 bits of float32 operands
    else:
        out = x
    return out


@triton.jit
def _dot(a, b, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b`` with float32 accumulation; float32 operands get full float32 products."""
    if ROUND == 0 or INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif ROUND == 3:
        out = tl.dot(a, b, input_precision="tf32")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_tile(ptr, stride, rows64, row_mask, k0, P, BLOCK_P: tl.constexpr, ROUND: tl.constexpr,
               INTERPRET: tl.constexpr):
    """Columns ``k0 .. k0 + BLOCK_P`` of the given rows, zero outside, as a dot operand."""
    ks = k0 + tl.arange(0, BLOCK_P)
    tile = tl.load(ptr + rows64[:, None] * stride + ks[None, :],
                   mask=row_mask[:, None] & (ks[None, :] < P), other=0.0)
    return _dot_operand(tile.to(tl.float32), ROUND, INTERPRET)


@triton.jit
def _scores_over_k(a_ptr, stride_a, rows64, row_mask, c_ptr, stride_c, cols64, col_mask, P,
                   BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``a[rows] . c[cols]^T`` (float32) over all of a wide ``P``, in chunks of ``SCORE_CHUNK``
    features: tiles of ``BLOCK_P`` loaded whole spill registers, and the loop up to ``P`` skips
    the padding of the last tile."""
    CHUNK: tl.constexpr = SCORE_CHUNK if BLOCK_P > SCORE_CHUNK else BLOCK_P
    s = tl.zeros([BLOCK_A, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, P, CHUNK):
        a = _load_tile(a_ptr, stride_a, rows64, row_mask, k0, P, CHUNK, ROUND, INTERPRET)
        c = _load_tile(c_ptr, stride_c, cols64, col_mask, k0, P, CHUNK, ROUND, INTERPRET)
        s += _dot(a, tl.trans(c), ROUND, INTERPRET)
    return s


# --------------------------------------------------------------------------- projection


@triton.jit
def project_kernel(x_ptr, w_ptr, b_ptr, out_ptr, norm_ptr, n_rows, D, P,
                   stride_x, stride_w, stride_out, eps,
                   HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, ROUND: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """``y = x W^T + b`` for BLOCK_M rows and BLOCK_P outputs, float32 accumulation.

    With ``NORMALIZE`` (all of P in this tile) the epilogue writes ``z = y / max(||y||, eps)``
    and ``||y||``; otherwise it writes ``y`` and ``normalize_kernel`` runs afterwards.
    """
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    outs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    out_mask = outs < P
    outs64 = outs.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < D
        x = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + outs64[:, None] * stride_w + kk[None, :],
                    mask=out_mask[:, None] & k_mask[None, :], other=0.0)
        if ROUND == 3:  # float32 inputs: TF32 operands
            x = _dot_operand(x, ROUND, INTERPRET)
            w = _dot_operand(w, ROUND, INTERPRET)
        acc += _dot(x, tl.trans(w), ROUND, INTERPRET)
    if HAS_BIAS:
        b = tl.load(b_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    if NORMALIZE:
        # Padding rows and columns hold zeros, so they add nothing to the norms.
        norm = tl.sqrt(tl.sum(acc * acc, axis=1))
        acc = acc / tl.maximum(norm, eps)[:, None]
        tl.store(norm_ptr + rows, norm, mask=row_mask)
    tl.store(out_ptr + rows64[:, None] * stride_out + outs[None, :], acc,
             mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def normalize_kernel(y_ptr, z_ptr, norm_ptr, n_rows, P, stride_y, stride_z, eps,
                     BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """``z = y / max(||y||, eps)`` (float32) and ``||y||``; ``z`` may alias ``y``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_P)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        mask = row_mask[:, None] & (p0 + cols[None, :] < P)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + p0 + cols[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32)
        sumsq += tl.sum(y * y, axis=1)
    norm = tl.sqrt(sumsq)
    denom = tl.maximum(norm, eps)
    for p0 in range(0, P, BLOCK_P):
        mask = row_mask[:, None] & (p0 + cols[None, :] < P)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + p0 + cols[None, :], mask=mask, other=0.0)
        tl.store(z_ptr + rows64[:, None] * stride_z + p0 + cols[None, :],
                 y.to(tl.float32) / denom[:, None], mask=mask)
    tl.store(norm_ptr + rows, norm, mask=row_mask)


@triton.jit
def normalize_backward_kernel(dz_ptr, z_ptr, norm_ptr, dy_ptr, n_rows, P, stride_dz, stride_z,
                              stride_dy, eps, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """``dy = (dz - z (z . dz)) / max(||y||, eps)``; rows under the clamp get ``dz / eps``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_P)
    radial = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        mask = row_mask[:, None] & (p0 + cols[None, :] < P)
        dz = tl.load(dz_ptr + rows64[:, None] * stride_dz + p0 + cols[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + rows64[:, None] * stride_z + p0 + cols[None, :], mask=mask, other=0.0)
        radial += tl.sum(z.to(tl.float32) * dz.to(tl.float32), axis=1)
    norm = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    # Under the clamp the normalization is y / eps, a plain scaling with no radial part.
    radial = tl.where(norm > eps, radial, 0.0)
    denom = tl.maximum(norm, eps)
    for p0 in range(0, P, BLOCK_P):
        mask = row_mask[:, None] & (p0 + cols[None, :] < P)
        dz = tl.load(dz_ptr + rows64[:, None] * stride_dz + p0 + cols[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + rows64[:, None] * stride_z + p0 + cols[None, :], mask=mask, other=0.0)
        dy = (dz.to(tl.float32) - z.to(tl.float32) * radial[:, None]) / denom[:, None]
        tl.store(dy_ptr + rows64[:, None] * stride_dy + p0 + cols[None, :], dy, mask=mask)


# --------------------------------------------------------------------------- similarity


@triton.jit
def lse_forward_kernel(za_ptr, zc_ptr, lse_ptr, n_rows, n_cols, P, stride_a, stride_c,
                       self_offset, scale, cols_per_split, split_stride,
                       FIXED_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_P: tl.constexpr, K_TILES: tl.constexpr, ROUND: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """``lse_i = logsumexp_c scale * za_i . zc_c`` over ``c != i + self_offset``, online.

    ``FIXED_SHIFT``: rows have norm <= 1, so ``scale * s - scale <= 0`` and the sum of
    ``exp(scale * s - scale)`` neither overflows nor (for the scales the launcher allows)
    underflows; no running max is needed. Otherwise a running max rescales the partial sum.
    Split ``pid(1)`` covers columns ``[pid(1) * cols_per_split, + cols_per_split)`` and writes
    its partial lse at ``lse_ptr + pid(1) * split_stride`` (-inf when no column is valid).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    c_begin = split * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, n_cols)
    lse_ptr += split.to(tl.int64) * split_stride
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    if K_TILES == 1:
        a = _load_tile(za_ptr, stride_a, rows64, row_mask, 0, P, BLOCK_P, ROUND, INTERPRET)

    # A finite start keeps exp(m_old - m_new) free of inf - inf; it never wins a max.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < c_end
        cols64 = cols.to(tl.int64)
        if K_TILES == 1:
            c = _load_tile(zc_ptr, stride_c, cols64, col_mask, 0, P, BLOCK_P, ROUND, INTERPRET)
            s = _dot(a, tl.trans(c), ROUND, INTERPRET)
        else:
            s = _scores_over_k(za_ptr, stride_a, rows64, row_mask, zc_ptr, stride_c, cols64,
                               col_mask, P, BLOCK_M, BLOCK_N, BLOCK_P, ROUND, INTERPRET)
        s = s * scale
        valid = col_mask[None, :] & (cols[None, :] != rows[:, None] + self_offset)
        if FIXED_SHIFT:
            l_i += tl.sum(tl.where(valid, tl.exp(s - scale), 0.0), axis=1)
        else:
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
    if FIXED_SHIFT:
        lse = scale + tl.log(l_i)
    else:
        lse = m_i + tl.log(l_i)  # no valid column: log(0) = -inf, as torch.logsumexp
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def lse_backward_rows_kernel(za_ptr, zc_ptr, lse_ptr, w_ptr, dza_ptr, n_rows, n_cols, P,
                             stride_a, stride_c, stride_d, self_offset, scale, cols_per_split,
                             split_stride,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                             K_TILES: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``dza_i = scale * w_i * sum_c Pr_ic zc_c`` for a block of anchors and output tile pid(1).

    ``Pr_ic = exp(scale * s_ic - lse_i)`` is recomputed tile by tile from the stored lse.
    Split ``pid(2)`` sums over columns ``[pid(2) * cols_per_split, + cols_per_split)`` into
    ``dza_ptr + pid(2) * split_stride``.
    """
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    split = tl.program_id(2)
    c_begin = split * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, n_cols)
    dza_ptr += split.to(tl.int64) * split_stride
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = scale * tl.load(w_ptr + rows, mask=row_mask, other=0.0)
    if ROUND == 2:
        coef = coef * (1.0 / FP16_PROB_SCALE)
    if K_TILES == 1:
        a = _load_tile(za_ptr, stride_a, rows64, row_mask, 0, P, BLOCK_P, ROUND, INTERPRET)

    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < c_end
        cols64 = cols.to(tl.int64)
        if K_TILES == 1:
            c_out = _load_tile(zc_ptr, stride_c, cols64, col_mask, 0, P, BLOCK_P, ROUND, INTERPRET)
            s = _dot(a, tl.trans(c_out), ROUND, INTERPRET)
        else:
            s = _scores_over_k(za_ptr, stride_a, rows64, row_mask, zc_ptr, stride_c, cols64,
                               col_mask, P, BLOCK_M, BLOCK_N, BLOCK_P, ROUND, INTERPRET)
            c_out = _load_tile(zc_ptr, stride_c, cols64, col_mask, pid_p * BLOCK_P, P, BLOCK_P,
                               ROUND, INTERPRET)
        valid = (row_mask[:, None] & col_mask[None, :]
                 & (cols[None, :] != rows[:, None] + self_offset))
        # where() first: masked entries may hold exp(+inf) when lse is -inf.
        p = tl.where(valid, tl.exp(s * scale - lse[:, None]), 0.0)
        if ROUND == 2:
            p = p * FP16_PROB_SCALE
        acc += _dot(_dot_operand(p, ROUND, INTERPRET), c_out, ROUND, INTERPRET)
    outs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(dza_ptr + rows64[:, None] * stride_d + outs[None, :], acc * coef[:, None],
             mask=row_mask[:, None] & (outs[None, :] < P))


@triton.jit
def lse_backward_cols_kernel(za_ptr, zc_ptr, lse_ptr, w_ptr, w_max_ptr, dzc_ptr, n_rows,
                             n_grad_cols, P,
                             stride_a, stride_c, stride_d, self_offset, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                             K_TILES: tl.constexpr, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``dzc_c = sum_i (scale * w_i * Pr_ic) za_i`` for a block of the first n_grad_cols columns.

    ``w_max_ptr`` holds ``max_i |w_i|`` (> 0): the tiles hold ``Pr_ic * w_i / max|w|``. Each
    column block loops over every anchor block itself (no atomics: deterministic).
    """
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_grad_cols
    cols64 = cols.to(tl.int64)
    w_max = tl.load(w_max_ptr)
    tile_scale = 1.0 / w_max
    if ROUND == 2:
        tile_scale = tile_scale * FP16_PROB_SCALE
    if K_TILES == 1:
        c = _load_tile(zc_ptr, stride_c, cols64, col_mask, 0, P, BLOCK_P, ROUND, INTERPRET)

    acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        if K_TILES == 1:
            a_out = _load_tile(za_ptr, stride_a, rows64, row_mask, 0, P, BLOCK_P, ROUND, INTERPRET)
            s_t = _dot(c, tl.trans(a_out), ROUND, INTERPRET)  # (columns, anchors)
        else:
            s_t = _scores_over_k(zc_ptr, stride_c, cols64, col_mask, za_ptr, stride_a, rows64,
                                 row_mask, P, BLOCK_N, BLOCK_M, BLOCK_P, ROUND, INTERPRET)
            a_out = _load_tile(za_ptr, stride_a, rows64, row_mask, pid_p * BLOCK_P, P, BLOCK_P,
                               ROUND, INTERPRET)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        coef = tl.load(w_ptr + rows, mask=row_mask, other=0.0) * tile_scale
        valid = (col_mask[:, None] & row_mask[None, :]
                 & (cols[:, None] != rows[None, :] + self_offset))
        p_t = tl.where(valid, tl.exp(s_t * scale - lse[None, :]), 0.0) * coef[None, :]
        acc += _dot(_dot_operand(p_t, ROUND, INTERPRET), a_out, ROUND, INTERPRET)
    outs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(dzc_ptr + cols64[:, None] * stride_d + outs[None, :], acc * (scale / tile_scale),
             mask=col_mask[:, None] & (outs[None, :] < P))

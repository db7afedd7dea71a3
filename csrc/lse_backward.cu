// Backward of the log-sum-exp term: tiles of Pr_ic = exp(scale * za_i . zc_c - lse_i) are
// recomputed from the stored per-anchor lse and multiplied into the feature gradients.
// Two kernels, no atomics (deterministic): the row kernel owns anchor rows and sweeps columns,
// the column kernel owns gradient columns and sweeps anchors. Each block accumulates its 64 rows
// of output in its own slice of a padded float32 workspace; splits of the sweep go to separate
// slices that the caller sums.
#include <cmath>

#include "clreg.h"
#include "tiles.cuh"

namespace clreg {
namespace {

// sm.g[m][n] = w_m * Pr(row0 + m, col0 + n) (times kFp16ProbScale for fp16), 0 outside the
// matrix and on the left-out pair;
// sm.vec_lse / sm.vec_w hold lse and the weight of rows row0..row0+63 (w = 1 for the row pass).
template <typename T, bool WEIGHTED>
__device__ __forceinline__ void probabilities(const tiles::Smem<T>& sm, int64_t row0,
                                              int64_t col0, int64_t n_anchor, int64_t n_col,
                                              int64_t self_offset, float scale) {
  using L = tiles::Layout<T>;
  constexpr int kPerThread = kTile * kTile / kThreads;
#pragma unroll 4
  for (int it = 0; it < kPerThread; ++it) {
    const int e = threadIdx.x + it * kThreads;
    const int m = e / kTile;
    const int n = e % kTile;
    const int64_t row = row0 + m;
    const int64_t col = col0 + n;
    float p = 0.f;
    if (row < n_anchor && col < n_col && col != row + self_offset) {
      p = expf(scale * sm.s[m * L::kSLd + n] - sm.vec_lse[m]);
      if (WEIGHTED) p *= sm.vec_w[m];
      if (std::is_same<T, __half>::value) p *= kFp16ProbScale;
    }
    // On the SIMT path g aliases s with the same stride: each element is read, then written,
    // by the same thread.
    sm.g[m * L::kProdLd + n] = tiles::from_float<T>(p);
  }
  __syncthreads();
}

// Grid: (anchor tiles, column splits). acc_rows[split][row][:] += sum_c Pr_rc zc_c.
template <typename T>
__global__ void __launch_bounds__(kThreads)
lse_backward_rows_kernel(const float* __restrict__ za, const float* __restrict__ zc,
                         const float* __restrict__ lse, float* __restrict__ acc_rows,
                         int64_t n_anchor, int64_t n_col, int64_t dim, int64_t self_offset,
                         float scale, int tiles_per_split) {
  using L = tiles::Layout<T>;
  __shared__ __align__(128) unsigned char raw[L::kTotalBytes];
  const tiles::Smem<T> sm(raw);

  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_col_tiles = ceil_div(n_col, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_col_tiles);
  const int64_t ld_out = round_up(dim, kTile);
  float* out = acc_rows + int64_t(blockIdx.y) * round_up(n_anchor, kTile) * ld_out + row0 * ld_out;

  if (threadIdx.x < kTile) {
    const int64_t row = row0 + threadIdx.x;
    sm.vec_lse[threadIdx.x] = row < n_anchor ? lse[row] : 0.f;
  }
  // compute_scores starts with a barrier-protected load, so vec_lse is visible before use.
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t col0 = t * kTile;
    tiles::compute_scores<T>(za, zc, row0, col0, n_anchor, n_col, dim, sm);
    probabilities<T, false>(sm, row0, col0, n_anchor, n_col, self_offset, scale);
    tiles::accumulate_product<T, false>(zc, col0, n_col, dim, sm, out, ld_out);
  }
}

// Grid: (gradient column tiles, anchor splits).
// acc_cols[split][col][:] += sum_i w_rel_i Pr_ic za_i.
template <typename T>
__global__ void __launch_bounds__(kThreads)
lse_backward_cols_kernel(const float* __restrict__ za, const float* __restrict__ zc,
                         const float* __restrict__ lse, const float* __restrict__ w_rel,
                         float* __restrict__ acc_cols, int64_t n_anchor, int64_t n_col,
                         int64_t n_grad_cols, int64_t dim, int64_t self_offset, float scale,
                         int tiles_per_split) {
  using L = tiles::Layout<T>;
  __shared__ __align__(128) unsigned char raw[L::kTotalBytes];
  const tiles::Smem<T> sm(raw);

  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_row_tiles = ceil_div(n_anchor, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_row_tiles);
  const int64_t ld_out = round_up(dim, kTile);
  float* out =
      acc_cols + int64_t(blockIdx.y) * round_up(n_grad_cols, kTile) * ld_out + col0 * ld_out;

  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t row0 = t * kTile;
    // The previous tile's last reads of vec_lse/vec_w ended before the barrier that closes
    // accumulate_product; the next barrier (inside compute_scores) publishes these writes.
    if (threadIdx.x < kTile) {
      const int64_t row = row0 + threadIdx.x;
      sm.vec_lse[threadIdx.x] = row < n_anchor ? lse[row] : 0.f;
      sm.vec_w[threadIdx.x] = row < n_anchor ? w_rel[row] : 0.f;
    }
    tiles::compute_scores<T>(za, zc, row0, col0, n_anchor, n_col, dim, sm);
    probabilities<T, true>(sm, row0, col0, n_anchor, n_col, self_offset, scale);
    // sm.g is [anchor][column]; the output rows are columns: multiply by G transposed.
    tiles::accumulate_product<T, true>(za, row0, n_anchor, dim, sm, out, ld_out);
  }
}

template <typename T>
cudaError_t launch_rows(const float* za, const float* zc, const float* lse, float* acc_rows,
                        int64_t n_anchor, int64_t n_col, int64_t dim, int64_t self_offset,
                        float scale, int n_splits, int tiles_per_split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_anchor, kTile)), static_cast<unsigned>(n_splits));
  lse_backward_rows_kernel<T><<<grid, kThreads, 0, stream>>>(
      za, zc, lse, acc_rows, n_anchor, n_col, dim, self_offset, scale, tiles_per_split);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cols(const float* za, const float* zc, const float* lse, const float* w_rel,
                        float* acc_cols, int64_t n_anchor, int64_t n_col, int64_t n_grad_cols,
                        int64_t dim, int64_t self_offset, float scale, int n_splits,
                        int tiles_per_split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_grad_cols, kTile)),
                  static_cast<unsigned>(n_splits));
  lse_backward_cols_kernel<T><<<grid, kThreads, 0, stream>>>(za, zc, lse, w_rel, acc_cols,
                                                              n_anchor, n_col, n_grad_cols, dim,
                                                              self_offset, scale, tiles_per_split);
  return cudaGetLastError();
}

template <typename Kernel>
int resident_blocks(Kernel kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
    cudaGetLastError();  // clear the error of the failed query
    return 0;
  }
  return n;
}

}  // namespace

int resident_blocks_lse_backward_rows(DotType dot) {
  switch (dot) {
    case DotType::kFloat16: return resident_blocks(lse_backward_rows_kernel<__half>);
    case DotType::kBFloat16: return resident_blocks(lse_backward_rows_kernel<__nv_bfloat16>);
    case DotType::kFloat32:
    default: return resident_blocks(lse_backward_rows_kernel<float>);
  }
}

int resident_blocks_lse_backward_cols(DotType dot) {
  switch (dot) {
    case DotType::kFloat16: return resident_blocks(lse_backward_cols_kernel<__half>);
    case DotType::kBFloat16: return resident_blocks(lse_backward_cols_kernel<__nv_bfloat16>);
    case DotType::kFloat32:
    default: return resident_blocks(lse_backward_cols_kernel<float>);
  }
}

cudaError_t launch_lse_backward_rows(const float* za, const float* zc, const float* lse,
                                     float* acc_rows, int64_t n_anchor, int64_t n_col,
                                     int64_t dim, int64_t self_offset, float scale, int n_splits,
                                     int tiles_per_split, DotType dot, cudaStream_t stream) {
  switch (dot) {
    case DotType::kFloat16:
      return launch_rows<__half>(za, zc, lse, acc_rows, n_anchor, n_col, dim, self_offset, scale,
                                 n_splits, tiles_per_split, stream);
    case DotType::kBFloat16:
      return launch_rows<__nv_bfloat16>(za, zc, lse, acc_rows, n_anchor, n_col, dim, self_offset,
                                        scale, n_splits, tiles_per_split, stream);
    case DotType::kFloat32:
    default:
      return launch_rows<float>(za, zc, lse, acc_rows, n_anchor, n_col, dim, self_offset, scale,
                                n_splits, tiles_per_split, stream);
  }
}

cudaError_t launch_lse_backward_cols(const float* za, const float* zc, const float* lse,
                                     const float* w_rel, float* acc_cols, int64_t n_anchor,
                                     int64_t n_col, int64_t n_grad_cols, int64_t dim,
                                     int64_t self_offset, float scale, int n_splits,
                                     int tiles_per_split, DotType dot, cudaStream_t stream) {
  switch (dot) {
    case DotType::kFloat16:
      return launch_cols<__half>(za, zc, lse, w_rel, acc_cols, n_anchor, n_col, n_grad_cols, dim,
                                 self_offset, scale, n_splits, tiles_per_split, stream);
    case DotType::kBFloat16:
      return launch_cols<__nv_bfloat16>(za, zc, lse, w_rel, acc_cols, n_anchor, n_col,
                                        n_grad_cols, dim, self_offset, scale, n_splits,
                                        tiles_per_split, stream);
    case DotType::kFloat32:
    default:
      return launch_cols<float>(za, zc, lse, w_rel, acc_cols, n_anchor, n_col, n_grad_cols, dim,
                                self_offset, scale, n_splits, tiles_per_split, stream);
  }
}

}  // namespace clreg

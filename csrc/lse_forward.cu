// Forward: per anchor row, the log-sum-exp of scale * za_i . zc_c over the columns c, leaving
// out the pair c == i + self_offset. Only one float per anchor (and split) leaves the kernel.
#include <cmath>

#include "clreg.h"
#include "tiles.cuh"

namespace clreg {
namespace {

// Grid: (anchor tiles, column splits). Two threads share an anchor row, each owning 32 of
// the 64 columns of every tile; they merge their (max, sum) pairs once, at the end.
template <typename T>
__global__ void __launch_bounds__(kThreads)
lse_forward_kernel(const float* __restrict__ za, const float* __restrict__ zc,
                   float* __restrict__ lse_partial, int64_t n_anchor, int64_t n_col,
                   int64_t dim, int64_t self_offset, float scale, bool fixed_shift,
                   int tiles_per_split) {
  using L = tiles::Layout<T>;
  __shared__ __align__(128) unsigned char raw[L::kTotalBytes];
  const tiles::Smem<T> sm(raw);

  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_col_tiles = ceil_div(n_col, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_col_tiles);

  const int r = threadIdx.x >> 1;          // row within the tile
  const int c_base = (threadIdx.x & 1) * 32;  // first of this thread's 32 columns
  const int64_t row = row0 + r;
  const int64_t self_col = row + self_offset;

  // Running (max, sum of exp(x - max)). With the fixed shift the "max" stays at scale, an
  // upper bound of every x = scale * s since s <= 1 for normalized rows.
  float run_max = fixed_shift ? scale : -INFINITY;
  float run_sum = 0.f;

  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t col0 = t * kTile;
    tiles::compute_scores<T>(za, zc, row0, col0, n_anchor, n_col, dim, sm);
    const float* s_row = sm.s + r * L::kSLd + c_base;
    if (!fixed_shift) {
      float tile_max = -INFINITY;
      for (int j = 0; j < 32; ++j) {
        const int64_t col = col0 + c_base + j;
        if (col < n_col && col != self_col) tile_max = fmaxf(tile_max, scale * s_row[j]);
      }
      if (tile_max > run_max) {
        run_sum *= expf(run_max - tile_max);  // exp(-inf) = 0 before the first valid column
        run_max = tile_max;
      }
    }
    if (run_max != -INFINITY) {
      for (int j = 0; j < 32; ++j) {
        const int64_t col = col0 + c_base + j;
        if (col < n_col && col != self_col) run_sum += expf(scale * s_row[j] - run_max);
      }
    }
    __syncthreads();  // every thread has read sm.s before the next tile overwrites it
  }

  // Merge the two halves of the row (lanes 2k and 2k+1 of the same warp).
  const float other_max = __shfl_xor_sync(0xffffffffu, run_max, 1);
  const float other_sum = __shfl_xor_sync(0xffffffffu, run_sum, 1);
  const float m = fmaxf(run_max, other_max);
  float lse = -INFINITY;
  if (m != -INFINITY) {
    const float total = run_sum * expf(run_max - m) + other_sum * expf(other_max - m);
    lse = m + logf(total);  // -inf when no column counted
  }
  if ((threadIdx.x & 1) == 0 && row < n_anchor)
    lse_partial[int64_t(blockIdx.y) * n_anchor + row] = lse;
}

template <typename T>
cudaError_t launch(const float* za, const float* zc, float* lse_partial, int64_t n_anchor,
                   int64_t n_col, int64_t dim, int64_t self_offset, float scale,
                   bool fixed_shift, int n_splits, int tiles_per_split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_anchor, kTile)), static_cast<unsigned>(n_splits));
  lse_forward_kernel<T><<<grid, kThreads, 0, stream>>>(za, zc, lse_partial, n_anchor, n_col, dim,
                                                        self_offset, scale, fixed_shift,
                                                        tiles_per_split);
  return cudaGetLastError();
}

template <typename T>
int resident_blocks() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lse_forward_kernel<T>, kThreads, 0) !=
      cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of the failed query
    return 0;
  }
  return n;
}

}  // namespace

int resident_blocks_lse_forward(DotType dot) {
  switch (dot) {
    case DotType::kFloat16: return resident_blocks<__half>();
    case DotType::kBFloat16: return resident_blocks<__nv_bfloat16>();
    case DotType::kFloat32:
    default: return resident_blocks<float>();
  }
}

cudaError_t launch_lse_forward(const float* za, const float* zc, float* lse_partial,
                               int64_t n_anchor, int64_t n_col, int64_t dim, int64_t self_offset,
                               float scale, bool fixed_shift, int n_splits, int tiles_per_split,
                               DotType dot, cudaStream_t stream) {
  switch (dot) {
    case DotType::kFloat16:
      return launch<__half>(za, zc, lse_partial, n_anchor, n_col, dim, self_offset, scale,
                            fixed_shift, n_splits, tiles_per_split, stream);
    case DotType::kBFloat16:
      return launch<__nv_bfloat16>(za, zc, lse_partial, n_anchor, n_col, dim, self_offset, scale,
                                   fixed_shift, n_splits, tiles_per_split, stream);
    case DotType::kFloat32:
    default:
      return launch<float>(za, zc, lse_partial, n_anchor, n_col, dim, self_offset, scale,
                           fixed_shift, n_splits, tiles_per_split, stream);
  }
}

}  // namespace clreg

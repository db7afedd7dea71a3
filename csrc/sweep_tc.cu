// Tensor-core sweep kernels for fp16/bf16 (sm_80+): the forward log-sum-exp and both backward
// passes in one FlashAttention-2-style loop.
//
// A block (4 warps) owns 64 rows of the "owned" operand (anchors for the forward and the row
// pass, gradient columns for the column pass) and sweeps the 64-row tiles of the other operand
// in [split * tiles_per_split, ...). Each warp owns 16 of the 64 rows:
//   - The owned tile is loaded once into shared memory and stays there (resident).
//   - Operands were rounded to T once, in global memory, by the caller, and zero-padded to
//     (round_up(n, 64), D) rows x features, D in {64, 128, 256}: loads need no bounds checks,
//     and padded rows and features contribute zeros to every product.
//   - Swept tiles stream through a kStages-deep cp.async (LDGSTS) ring in shared memory, so the
//     load of tile t + kStages - 1 overlaps the math of tile t.
//   - Scores S = own . swept^T come from mma.sync m16n8k16 (HMMA) into registers; the exp /
//     scale / mask epilogue runs on the accumulator fragments, and the backward feeds the
//     probabilities straight from those registers into the A operand of the next mma (the
//     C-to-A fragment identity of m16n8k16), no shared-memory round trip.
//   - Backward: the 16 x D float32 output block of each warp lives in registers for the whole
//     sweep (D / 2 floats per thread) and is written once, at the end, to this split's slice of
//     the workspace. Every element of the slice is written (padded rows and features as 0).
// Shared memory rows are XOR-swizzled in 16-byte chunks (chunk c of row r at c ^ (r % 8)), so the
// 8 rows an ldmatrix phase reads hit 8 different bank groups, in both the plain and the
// transposed reads.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "clreg.h"
#include "mma_sm80.cuh"
#include "sweep_dispatch.cuh"

namespace clreg {
namespace {

constexpr int kRowsPerWarp = 16;

template <int D>
struct SweepConfig {
  static_assert(D % 64 == 0 && D <= kSweepMaxDim, "D: multiple of 64, at most 256");
  static constexpr int kStages = D <= 128 ? 3 : 2;  // what fits next to the resident tile
  static constexpr int kChunks = D / 8;             // 16-byte chunks per row
  static constexpr int kTileElems = kTile * D;
  // A ring stage: the swept tile, then (column pass) its 64 lse and 64 w_rel values.
  static constexpr int kStageBytes = kTileElems * 2 + 2 * kTile * 4;
  static constexpr int kSmemBytes = kTileElems * 2 + kStages * kStageBytes;
  // Backward at D = 256: the 64 swept rows of a tile go through the score / probability /
  // product steps 16 at a time, so that 8 score registers sit next to the 128 accumulators
  // (32 at a time spills on sm_90).
  static constexpr int kSweptPerStep = D == 256 ? 16 : 64;
  // sm_80 code also runs on sm_86 / sm_89, whose blocks get at most 99 KB of shared memory.
  static_assert(kSmemBytes <= 99 * 1024, "shared memory of one block");
};

// Element offset of (row r, feature k) in a swizzled [64][D] tile; k a multiple of 8.
template <int D>
__device__ __forceinline__ int swz(int r, int k) {
  return r * D + ((((k >> 3) ^ (r & 7))) << 3);
}

// tile[64][D] <- src rows row0..row0+63 (whole padded rows, 16-byte chunks, asynchronous).
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* tile, const T* __restrict__ src, int64_t row0) {
  using C = SweepConfig<D>;
#pragma unroll
  for (int it = 0; it < kTile * C::kChunks / kThreads; ++it) {
    const int e = threadIdx.x + it * kThreads;
    const int r = e / C::kChunks;
    const int c = e % C::kChunks;
    sm80::cp_async_16(tile + swz<D>(r, c * 8), src + (row0 + r) * D + c * 8);
  }
}

// vec[0..63] <- lse[row0..], vec[64..127] <- w[row0..] (padded to whole tiles by the caller).
__device__ __forceinline__ void load_vectors_async(float* vec, const float* __restrict__ lse,
                                                   const float* __restrict__ w, int64_t row0) {
  if (threadIdx.x < 32) {
    const int c = threadIdx.x & 15;
    const float* src = (threadIdx.x < 16 ? lse : w) + row0 + 4 * c;
    sm80::cp_async_16(vec + (threadIdx.x < 16 ? 0 : kTile) + 4 * c, src);
  }
}

// s[nb][.] = own rows (warp's 16) . swept rows (n0 + 8 nb .. + 7)^T, over all D features.
template <typename T, int D, int NB>
__device__ __forceinline__ void score_fragments(float (&s)[NB][4], const T* own_tile,
                                                const T* swept_tile, int warp_row0, int n0,
                                                int lane) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
  // Unrolled by 2, not fully: at D = 256 a full unroll hoists enough ldmatrix loads to spill.
#pragma unroll 2
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    // Matrices: rows 0-7 / 8-15 at k, rows 0-7 / 8-15 at k + 8 (a0..a3).
    sm80::ldmatrix_x4(a, own_tile + swz<D>(warp_row0 + (lane & 15), kk * 16 + 8 * (lane >> 4)));
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t b[4];
      // B(k, n) = swept[n][k]: matrices n 0-7 at k, n 0-7 at k + 8, n 8-15 at k, n 8-15 at k + 8.
      sm80::ldmatrix_x4(b, swept_tile + swz<D>(n0 + np * 16 + (lane & 7) + 8 * (lane >> 4),
                                               kk * 16 + 8 * ((lane >> 3) & 1)));
      sm80::mma_16816<T>(s[2 * np], a, b[0], b[1]);
      sm80::mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Grid: (owned tiles, splits); 128 threads. See the file comment.
//   own, swept: pre-rounded, zero-padded operands (round_up(n, 64) x D).
//   kForward: out = lse_partial (splits, n_own), the log-sum-exp over this split's columns.
//   kRows:    lse = lse of the owned rows [n_own]; out[split][own][0..ld_out) = sum_c Pr_oc swept_c.
//   kCols:    lse, w = lse and w_rel of the swept rows, zero-padded to round_up(n_swept, 64);
//             out[split][own][0..ld_out) = sum_i w_i Pr_io swept_i.
// The pair swept == own + pair_offset is left out.
template <typename T, int D, SweepMode M>
// Min. 1 block per SM: without it ptxas caps registers for occupancy and spills.
__global__ void __launch_bounds__(kThreads, 1)
sweep_tc_kernel(const T* __restrict__ own, const T* __restrict__ swept,
                const float* __restrict__ lse, const float* __restrict__ w,
                float* __restrict__ out, int64_t n_own, int64_t n_swept, int64_t ld_out,
                int64_t pair_offset, float scale, bool fixed_shift, int tiles_per_split) {
  using C = SweepConfig<D>;
  constexpr bool kForward = M == SweepMode::kForward;
  constexpr int kSteps = kForward ? 1 : kTile / C::kSweptPerStep;
  constexpr int kNB = kForward ? 8 : C::kSweptPerStep / 8;  // 8-column score blocks per step
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* own_tile = reinterpret_cast<T*>(smem_raw);
  unsigned char* ring = smem_raw + C::kTileElems * 2;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;  // fragment row (and row + 8)
  const int q = lane & 3;   // fragment column pair
  const int warp_row0 = warp * kRowsPerWarp;
  const int64_t own0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_swept_tiles = ceil_div(n_swept, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_swept_tiles);
  const int n_tiles = static_cast<int>(tile_end - tile_begin);

  // This thread's two owned rows: own0 + warp_row0 + g (+ 8).
  int64_t own_row[2];
  bool own_ok[2];
  float lse_own[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    own_row[h] = own0 + warp_row0 + g + 8 * h;
    own_ok[h] = own_row[h] < n_own;
    if (M == SweepMode::kRows && own_ok[h]) lse_own[h] = __ldg(lse + own_row[h]);
  }

  auto stage_tile = [&](int st) { return reinterpret_cast<T*>(ring + st * C::kStageBytes); };
  auto stage_vec = [&](int st) {
    return reinterpret_cast<float*>(ring + st * C::kStageBytes + C::kTileElems * 2);
  };
  auto load_stage = [&](int st, int64_t tile) {
    load_tile_async<T, D>(stage_tile(st), swept, tile * kTile);
    if (M == SweepMode::kCols) load_vectors_async(stage_vec(st), lse, w, tile * kTile);
  };

  // Prologue: the owned tile (group 0), then the first kStages - 1 swept tiles (one group each,
  // committed even when empty so that the group count is the same in every thread and step).
  load_tile_async<T, D>(own_tile, own, own0);
  sm80::cp_async_commit();
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_tiles) load_stage(st, tile_begin + st);
    sm80::cp_async_commit();
  }

  // Forward: running (max, sum) per owned row over this thread's columns.
  float run_max[2], run_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) run_max[h] = fixed_shift ? scale : -INFINITY;
  // Backward: the warp's 16 x D output block, in registers for the whole sweep.
  float acc[kForward ? 1 : D / 8][4];
#pragma unroll
  for (int nd = 0; nd < (kForward ? 1 : D / 8); ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nd][e] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    // Groups committed: 1 + (kStages - 1) + it; tile `it` is group 1 + it.
    sm80::cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile `it` visible to all; stage (it - 1) % kStages is free again
    {
      const int next = it + C::kStages - 1;
      if (next < n_tiles) load_stage(next % C::kStages, tile_begin + next);
      sm80::cp_async_commit();
    }
    const T* swept_tile = stage_tile(it % C::kStages);
    const float* vec = stage_vec(it % C::kStages);
    const int64_t sw0 = (tile_begin + it) * kTile;
    // Masks in tile-local 32-bit indices: columns < n_valid count, except column diag[h] of
    // owned row h (-1 or >= 64 when the left-out pair is not in this tile).
    const int n_valid = static_cast<int>(min(int64_t(kTile), n_swept - sw0));
    int diag[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t d = own_row[h] + pair_offset - sw0;
      diag[h] = (d < 0 || d >= kTile) ? -1 : static_cast<int>(d);
    }

#pragma unroll 1  // (kSteps = 4 at D = 256 only; unrolled, the steps spill)
    for (int step = 0; step < kSteps; ++step) {
      const int n0 = step * kNB * 8;  // first swept row of this step within the tile
      float s[kNB][4];
      score_fragments<T, D, kNB>(s, own_tile, swept_tile, warp_row0, n0, lane);

      // Epilogue on the fragments: element e of block nb is (row g + 8 (e / 2), tile column
      // n0 + 8 nb + 2 q + e % 2) of the warp's score block.
      if (kForward) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float x[kNB][2];
#pragma unroll
          for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int col = n0 + 8 * nb + 2 * q + j;
              x[nb][j] = (col < n_valid && col != diag[h]) ? scale * s[nb][2 * h + j] : -INFINITY;
            }
          if (!fixed_shift) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < kNB; ++nb) tile_max = fmaxf(tile_max, fmaxf(x[nb][0], x[nb][1]));
            if (tile_max > run_max[h]) {
              run_sum[h] *= expf(run_max[h] - tile_max);  // 0 before the first counted column
              run_max[h] = tile_max;
            }
          }
          if (run_max[h] != -INFINITY) {
#pragma unroll
            for (int nb = 0; nb < kNB; ++nb)
              run_sum[h] += expf(x[nb][0] - run_max[h]) + expf(x[nb][1] - run_max[h]);
          }
        }
      } else {
        // Probabilities, in place of the scores.
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int col = n0 + 8 * nb + 2 * q + (e & 1);
            float p = 0.f;
            if (own_ok[h] && col < n_valid && col != diag[h]) {
              if (M == SweepMode::kRows)
                p = expf(scale * s[nb][e] - lse_own[h]);
              else
                p = vec[kTile + col] * expf(scale * s[nb][e] - vec[col]);
              if (std::is_same<T, __half>::value) p *= kFp16ProbScale;
            }
            s[nb][e] = p;
          }
        // acc += P (16 x swept rows of the step) . swept_tile rows (x D); P's C fragments are
        // the A fragments of this product.
#pragma unroll
        for (int kk = 0; kk < kNB / 2; ++kk) {
          uint32_t a[4];
          a[0] = sm80::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          a[1] = sm80::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          a[2] = sm80::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          a[3] = sm80::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int np = 0; np < D / 16; ++np) {
            uint32_t b[4];
            // B(k, n) = swept_tile[k][n], stored [k][n]: transposed reads. Matrices: k 0-7 at
            // n, k 8-15 at n, k 0-7 at n + 8, k 8-15 at n + 8.
            sm80::ldmatrix_x4_trans(
                b, swept_tile + swz<D>(n0 + kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1),
                                       np * 16 + 8 * (lane >> 4)));
            sm80::mma_16816<T>(acc[2 * np], a, b[0], b[1]);
            sm80::mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
          }
        }
      }
    }
  }
  sm80::cp_async_wait<0>();  // no copy may outlive the block (pending: empty groups, or own)

  if (kForward) {
    // Merge the four lanes of each row (q = 0..3), then lane q == 0 writes.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = run_max[h], sum = run_sum[h];
#pragma unroll
      for (int mask = 1; mask <= 2; mask <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, mask);
        const float os = __shfl_xor_sync(0xffffffffu, sum, mask);
        const float nm = fmaxf(m, om);
        if (nm != -INFINITY) {
          sum = sum * expf(m - nm) + os * expf(om - nm);
          m = nm;
        }
      }
      if (q == 0 && own_ok[h])
        out[int64_t(blockIdx.y) * n_own + own_row[h]] =
            (m == -INFINITY || sum == 0.f) ? -INFINITY : m + logf(sum);
    }
  } else {
    // Written once: all 64 rows of the block (padded ones hold 0), features < ld_out.
    float* slice = out + int64_t(blockIdx.y) * round_up(n_own, kTile) * ld_out;
#pragma unroll
    for (int nd = 0; nd < (kForward ? 1 : D / 8); ++nd) {
      if (8 * nd < ld_out) {  // ld_out = round_up(dim, 64) <= D
#pragma unroll
        for (int h = 0; h < 2; ++h)
          *reinterpret_cast<float2*>(slice + own_row[h] * ld_out + 8 * nd + 2 * q) =
              make_float2(acc[nd][2 * h], acc[nd][2 * h + 1]);
      }
    }
  }
}

template <typename T, int D, SweepMode M>
cudaError_t launch_one(const void* own, const void* swept, const float* lse, const float* w,
                       float* out, int64_t n_own, int64_t n_swept, int64_t ld_out,
                       int64_t pair_offset, float scale, bool fixed_shift, int n_splits,
                       int tiles_per_split, cudaStream_t stream) {
  using C = SweepConfig<D>;
  auto kernel = sweep_tc_kernel<T, D, M>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(n_own, kTile)), static_cast<unsigned>(n_splits));
  kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(
      static_cast<const T*>(own), static_cast<const T*>(swept), lse, w, out, n_own, n_swept,
      ld_out, pair_offset, scale, fixed_shift, tiles_per_split);
  return cudaGetLastError();
}

}  // namespace

int sweep_tc_dim(int64_t dim) {
  if (dim <= 64) return 64;
  if (dim <= 128) return 128;
  if (dim <= kSweepMaxDim) return 256;
  return 0;
}

cudaError_t launch_sweep_tc(SweepMode mode, const void* own, const void* swept, const float* lse,
                            const float* w, float* out, int64_t n_own, int64_t n_swept,
                            int64_t ld_out, int64_t pair_offset, float scale, bool fixed_shift,
                            int dim_pad, int n_splits, int tiles_per_split, DotType dot,
                            cudaStream_t stream) {
  if (dot == DotType::kFloat32 || (dim_pad != 64 && dim_pad != 128 && dim_pad != 256) ||
      ld_out > dim_pad)
    return cudaErrorInvalidValue;
  return dispatch_dot_dim_mode(dot, dim_pad, mode, [&](auto t, auto d, auto m) {
    return launch_one<decltype(t), decltype(d)::value, decltype(m)::value>(
        own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset, scale, fixed_shift,
        n_splits, tiles_per_split, stream);
  });
}

int resident_blocks_sweep_tc(SweepMode mode, DotType dot, int dim_pad) {
  if (dot == DotType::kFloat32) return 0;
  return dispatch_dot_dim_mode(dot, dim_pad, mode, [](auto t, auto d, auto m) {
    return resident_blocks_of(sweep_tc_kernel<decltype(t), decltype(d)::value, decltype(m)::value>,
                              kThreads, SweepConfig<decltype(d)::value>::kSmemBytes);
  });
}

}  // namespace clreg

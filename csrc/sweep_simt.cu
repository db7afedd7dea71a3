// Float32 sweep kernels (SIMT FMAs, no TF32; sm_80+): the forward log-sum-exp and both backward
// passes with the output accumulators in registers for the whole sweep (issue 18).
//
// The loop follows sweep_tc.cu, with float32 FMAs in place of mma.sync:
//   - A block (128 threads) owns 64 rows of the "owned" operand (anchors for the forward and the
//     row pass, gradient columns for the column pass), loaded once into shared memory, where it
//     stays (resident), and sweeps the rows of the other operand in
//     [split * tiles_per_split * 64, ...), kRows rows per step.
//   - Operands are the caller's float32 rows (row stride ld, a multiple of 4 floats, 16-byte
//     aligned base): cp.async copies 16-byte chunks and zero-fills chunks past `dim` and rows past
//     the end (its src-size operand), so padded rows and features contribute zeros and no padded
//     copy of the operands is needed.
//   - Swept rows stream through a kStages-deep cp.async ring; a stage holds kRows = 4096 / D rows
//     (16 KB of float32), so the owned tile and the ring fit the 99 KB of an sm_86/89 block.
//   - Thread (ty, tx) = (threadIdx / 16, threadIdx % 16) owns the owned rows ty + 8 i (i < 8):
//     scores S = own . swept^T for the stage's columns tx + 16 j (j < kRows / 16), the epilogue
//     on those registers, and (backward) the output features tx + 16 p (p < D / 16) of its rows,
//     in registers for the whole sweep (D / 2 floats) and written once, at the end, to this
//     split's workspace slice (every element of the slice, padded rows and features as 0).
//   - The product acc += P . swept takes P[row][k] from the lane that computed it with a
//     half-warp shuffle (the 16 lanes of a row group are one half-warp): no shared memory and no
//     barrier for P.
// Shared-memory rows are D + 4 floats apart: the 16-byte score reads of 8 consecutive rows (one
// phase) then hit 8 different bank groups, and the cp.async destinations stay 16-byte aligned.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "clreg.h"
#include "sweep_dispatch.cuh"

namespace clreg {
namespace {

template <int D>
struct SimtConfig {
  static_assert(D == 64 || D == 128 || D == 256, "D: 64, 128 or 256");
  static constexpr int kRows = 4096 / D;         // swept rows per step (one ring stage)
  static constexpr int kLd = D + 4;               // shared-memory row stride (floats)
  static constexpr int kStages = D == 256 ? 2 : 3;  // what fits next to the owned tile
  static constexpr int kChunks = D / 4;           // 16-byte chunks per row
  static constexpr int kNJ = kRows / 16;          // swept columns per thread per step
  static constexpr int kNP = D / 16;              // output features per thread
  static constexpr int kOwnBytes = kTile * kLd * 4;
  // A ring stage: the swept rows, then (column pass) their kRows lse and kRows w_rel values.
  static constexpr int kStageBytes = kRows * kLd * 4 + 2 * kRows * 4;
  static constexpr int kSmemBytes = kOwnBytes + kStages * kStageBytes;
  static_assert(kRows % 16 == 0, "whole half-warps of swept columns");
  static_assert(kRows * kChunks % kThreads == 0 && kTile * kChunks % kThreads == 0,
                "whole chunks per thread");
  static_assert(kOwnBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte aligned regions");
  // sm_80 code also runs on sm_86 / sm_89, whose blocks get at most 99 KB of shared memory.
  static_assert(kSmemBytes <= 99 * 1024, "shared memory of one block");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes to shared memory, asynchronously: `src_bytes` (0..16) from global memory, the rest
// zero-filled (cp.async's src-size); with src_bytes = 0 nothing is read.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// dst[r][0..D) <- src rows row0 + r (r < ROWS), zeros past n_rows and past dim.
template <int D, int ROWS>
__device__ __forceinline__ void load_rows_async(float* dst, const float* __restrict__ src,
                                                int64_t ld, int64_t row0, int64_t n_rows,
                                                int dim) {
  using C = SimtConfig<D>;
#pragma unroll
  for (int it = 0; it < ROWS * C::kChunks / kThreads; ++it) {
    const int e = threadIdx.x + it * kThreads;
    const int r = e / C::kChunks;
    const int c = e % C::kChunks;
    const int64_t row = row0 + r;
    const int bytes = row < n_rows ? max(0, min(16, 4 * (dim - 4 * c))) : 0;
    // A byte count of 0 reads nothing, but the address stays a valid one (the operand's start).
    const float* from = bytes > 0 ? src + row * ld + 4 * c : src;
    cp_async_16_zfill(dst + r * C::kLd + 4 * c, from, bytes);
  }
}

// vec[0..R) <- lse[row0..], vec[R..2R) <- w[row0..] (padded to whole tiles by the caller).
template <int R>
__device__ __forceinline__ void load_vectors_async(float* vec, const float* __restrict__ lse,
                                                   const float* __restrict__ w, int64_t row0) {
  constexpr int kQ = R / 4;  // 16-byte chunks per vector
  if (threadIdx.x < 2 * kQ) {
    const int c = threadIdx.x % kQ;
    const bool is_lse = threadIdx.x < kQ;
    cp_async_16_zfill(vec + (is_lse ? 0 : R) + 4 * c, (is_lse ? lse : w) + row0 + 4 * c, 16);
  }
}

// Grid: (owned tiles, splits); 128 threads. See the file comment.
//   own, swept: float32 rows (ld_own / ld_swept floats apart), features [0, dim), dim <= D.
//   kForward: out = lse_partial (splits, n_own), the log-sum-exp over this split's columns.
//   kRows:    lse = lse of the owned rows [n_own]; out[split][own][0..ld_out) = sum_c Pr_oc swept_c.
//   kCols:    lse, w = lse and w_rel of the swept rows, zero-padded to round_up(n_swept, 64);
//             out[split][own][0..ld_out) = sum_i w_i Pr_io swept_i.
// The pair swept == own + pair_offset is left out.
template <int D, SweepMode M>
// Min. 1 block per SM: ptxas may use up to 255 registers (D / 2 accumulators at D = 256).
__global__ void __launch_bounds__(kThreads, 1)
sweep_simt_kernel(const float* __restrict__ own, int64_t ld_own, const float* __restrict__ swept,
                  int64_t ld_swept, int dim, const float* __restrict__ lse,
                  const float* __restrict__ w, float* __restrict__ out, int64_t n_own,
                  int64_t n_swept, int64_t ld_out, int64_t pair_offset, float scale,
                  bool fixed_shift, int tiles_per_split) {
  using C = SimtConfig<D>;
  constexpr bool kForward = M == SweepMode::kForward;
  constexpr int kNP = kForward ? 1 : C::kNP;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* own_tile = reinterpret_cast<float*>(smem_raw);
  unsigned char* ring = smem_raw + C::kOwnBytes;

  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
  const int64_t own0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_swept_tiles = ceil_div(n_swept, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_swept_tiles);
  const int64_t swept_begin = tile_begin * kTile;
  // Steps of kRows swept rows; those wholly past n_swept (in the last tile) are skipped.
  const int n_steps =
      static_cast<int>(ceil_div(min(tile_end * kTile, n_swept) - swept_begin, C::kRows));

  // This thread's owned rows: own0 + ty + 8 i.
  int64_t own_row[8];
  bool own_ok[8];
  float lse_own[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    own_row[i] = own0 + ty + 8 * i;
    own_ok[i] = own_row[i] < n_own;
    lse_own[i] = (M == SweepMode::kRows && own_ok[i]) ? __ldg(lse + own_row[i]) : 0.f;
  }

  auto stage_rows = [&](int st) { return reinterpret_cast<float*>(ring + st * C::kStageBytes); };
  auto stage_vec = [&](int st) { return stage_rows(st) + C::kRows * C::kLd; };
  auto load_stage = [&](int st, int step) {
    const int64_t row0 = swept_begin + int64_t(step) * C::kRows;
    load_rows_async<D, C::kRows>(stage_rows(st), swept, ld_swept, row0, n_swept, dim);
    if (M == SweepMode::kCols) load_vectors_async<C::kRows>(stage_vec(st), lse, w, row0);
  };

  // Prologue: the owned tile (group 0), then the first kStages - 1 steps (one group each,
  // committed even when empty so that the group count is the same in every thread and step).
  load_rows_async<D, kTile>(own_tile, own, ld_own, own0, n_own, dim);
  cp_async_commit();
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_steps) load_stage(st, st);
    cp_async_commit();
  }

  // Forward: running (max, sum) per owned row over this thread's columns.
  float run_max[8], run_sum[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    run_max[i] = fixed_shift ? scale : -INFINITY;
    run_sum[i] = 0.f;
  }
  // Backward: the thread's 8 x D / 16 outputs, in registers for the whole sweep.
  float acc[8][kNP];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int p = 0; p < kNP; ++p) acc[i][p] = 0.f;

  for (int it = 0; it < n_steps; ++it) {
    // Groups committed: 1 + (kStages - 1) + it; step `it` is group 1 + it.
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // step `it` visible to all; stage (it - 1) % kStages is free again
    {
      const int next = it + C::kStages - 1;
      if (next < n_steps) load_stage(next % C::kStages, next);
      cp_async_commit();
    }
    const float* rows = stage_rows(it % C::kStages);
    const float* vec = stage_vec(it % C::kStages);
    const int64_t sw0 = swept_begin + int64_t(it) * C::kRows;
    // Masks in step-local 32-bit indices: columns < n_valid count, except column diag[i] of
    // owned row i (-1 when the left-out pair is not in this step).
    const int n_valid = static_cast<int>(min(int64_t(C::kRows), n_swept - sw0));
    int diag[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = own_row[i] + pair_offset - sw0;
      diag[i] = (d < 0 || d >= C::kRows) ? -1 : static_cast<int>(d);
    }

    // s[i][j] = own row (ty + 8 i) . swept row (tx + 16 j), 4 features at a time.
    float s[8][C::kNJ];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < C::kNJ; ++j) s[i][j] = 0.f;
#pragma unroll 2
    for (int k = 0; k < D; k += 4) {
      float4 b[C::kNJ];
#pragma unroll
      for (int j = 0; j < C::kNJ; ++j)
        b[j] = *reinterpret_cast<const float4*>(rows + (tx + 16 * j) * C::kLd + k);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4 a = *reinterpret_cast<const float4*>(own_tile + (ty + 8 * i) * C::kLd + k);
#pragma unroll
        for (int j = 0; j < C::kNJ; ++j) {
          s[i][j] = fmaf(a.x, b[j].x, s[i][j]);
          s[i][j] = fmaf(a.y, b[j].y, s[i][j]);
          s[i][j] = fmaf(a.z, b[j].z, s[i][j]);
          s[i][j] = fmaf(a.w, b[j].w, s[i][j]);
        }
      }
    }

    if (kForward) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float x[C::kNJ];
#pragma unroll
        for (int j = 0; j < C::kNJ; ++j) {
          const int col = tx + 16 * j;
          x[j] = (col < n_valid && col != diag[i]) ? scale * s[i][j] : -INFINITY;
        }
        if (!fixed_shift) {
          float step_max = -INFINITY;
#pragma unroll
          for (int j = 0; j < C::kNJ; ++j) step_max = fmaxf(step_max, x[j]);
          if (step_max > run_max[i]) {
            run_sum[i] *= expf(run_max[i] - step_max);  // 0 before the first counted column
            run_max[i] = step_max;
          }
        }
        if (run_max[i] != -INFINITY) {
#pragma unroll
          for (int j = 0; j < C::kNJ; ++j) run_sum[i] += expf(x[j] - run_max[i]);
        }
      }
    } else {
      // Probabilities, in place of the scores.
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < C::kNJ; ++j) {
          const int col = tx + 16 * j;
          float p = 0.f;
          if (own_ok[i] && col < n_valid && col != diag[i]) {
            if (M == SweepMode::kRows)
              p = expf(scale * s[i][j] - lse_own[i]);
            else
              p = vec[C::kRows + col] * expf(scale * s[i][j] - vec[col]);
          }
          s[i][j] = p;
        }
      // acc[i][p] += sum_k P[ty + 8 i][k] rows[k][tx + 16 p]; P[.][k] sits in lane k % 16 of
      // this half-warp, register j = k / 16.
#pragma unroll
      for (int j = 0; j < C::kNJ; ++j) {
#pragma unroll 2
        for (int kx = 0; kx < 16; ++kx) {
          const int k = kx + 16 * j;
          float pk[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) pk[i] = __shfl_sync(0xffffffffu, s[i][j], kx, 16);
          float b[kNP];
#pragma unroll
          for (int p = 0; p < kNP; ++p) b[p] = rows[k * C::kLd + tx + 16 * p];
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int p = 0; p < kNP; ++p) acc[i][p] = fmaf(pk[i], b[p], acc[i][p]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block (pending: empty groups, or own)

  if (kForward) {
    // Merge the 16 lanes of each row group (tx = 0..15), then lane tx == 0 writes.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float m = run_max[i], sum = run_sum[i];
#pragma unroll
      for (int mask = 1; mask <= 8; mask <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, mask);
        const float os = __shfl_xor_sync(0xffffffffu, sum, mask);
        const float nm = fmaxf(m, om);
        if (nm != -INFINITY) {
          sum = sum * expf(m - nm) + os * expf(om - nm);
          m = nm;
        }
      }
      if (tx == 0 && own_ok[i])
        out[int64_t(blockIdx.y) * n_own + own_row[i]] =
            (m == -INFINITY || sum == 0.f) ? -INFINITY : m + logf(sum);
    }
  } else {
    // Written once: all 64 rows of the block (padded ones hold 0), features < ld_out.
    float* slice = out + int64_t(blockIdx.y) * round_up(n_own, kTile) * ld_out;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int p = 0; p < kNP; ++p) {
        const int col = tx + 16 * p;
        if (col < ld_out) slice[own_row[i] * ld_out + col] = acc[i][p];  // ld_out <= D
      }
  }
}

template <int D, SweepMode M>
cudaError_t launch_one(const float* own, int64_t ld_own, const float* swept, int64_t ld_swept,
                       int dim, const float* lse, const float* w, float* out, int64_t n_own,
                       int64_t n_swept, int64_t ld_out, int64_t pair_offset, float scale,
                       bool fixed_shift, int n_splits, int tiles_per_split,
                       cudaStream_t stream) {
  using C = SimtConfig<D>;
  auto kernel = sweep_simt_kernel<D, M>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(n_own, kTile)), static_cast<unsigned>(n_splits));
  kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(own, ld_own, swept, ld_swept, dim, lse, w,
                                                    out, n_own, n_swept, ld_out, pair_offset,
                                                    scale, fixed_shift, tiles_per_split);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sweep_simt(SweepMode mode, const float* own, int64_t ld_own,
                              const float* swept, int64_t ld_swept, int64_t dim, const float* lse,
                              const float* w, float* out, int64_t n_own, int64_t n_swept,
                              int64_t ld_out, int64_t pair_offset, float scale, bool fixed_shift,
                              int dim_pad, int n_splits, int tiles_per_split,
                              cudaStream_t stream) {
  // The 16-byte copies need whole, aligned chunks: rows 4 floats apart, 16-byte aligned bases.
  const bool aligned = ld_own % 4 == 0 && ld_swept % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(own) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(swept) % 16 == 0;
  if ((dim_pad != 64 && dim_pad != 128 && dim_pad != 256) || dim > dim_pad || dim > ld_own ||
      dim > ld_swept || !aligned || ld_out > dim_pad)
    return cudaErrorInvalidValue;
  return dispatch_dim_mode(dim_pad, mode, [&](auto d, auto m) {
    return launch_one<decltype(d)::value, decltype(m)::value>(
        own, ld_own, swept, ld_swept, static_cast<int>(dim), lse, w, out, n_own, n_swept, ld_out,
        pair_offset, scale, fixed_shift, n_splits, tiles_per_split, stream);
  });
}

int resident_blocks_sweep_simt(SweepMode mode, int dim_pad) {
  return dispatch_dim_mode(dim_pad, mode, [](auto d, auto m) {
    return resident_blocks_of(sweep_simt_kernel<decltype(d)::value, decltype(m)::value>, kThreads,
                              SimtConfig<decltype(d)::value>::kSmemBytes);
  });
}

}  // namespace clreg

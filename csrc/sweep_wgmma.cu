// Hopper (sm_90a) tensor-core sweep: the same three passes, arguments and outputs as
// sweep_tc.cu (launch_sweep_tc), on warpgroup MMAs (wgmma, HGMMA in SASS), built with CuTe.
//
// A block is one warpgroup (128 threads) and owns 64 rows of the "owned" operand (anchors for
// the forward and the row pass, gradient columns for the column pass); it sweeps the 64-row
// tiles of the other operand in [split * tiles_per_split, ...):
//   - Operands were rounded to T once, in global memory, by the caller and zero-padded to
//     (round_up(n, 64), D), D in {64, 128, 256}: loads need no bounds checks, padded rows and
//     features contribute zeros to every product.
//   - Shared memory tiles use CuTe's K-major 128-byte-swizzle GMMA layout (8 rows x 64 features
//     per atom), which is what the wgmma shared-memory descriptors read. The owned tile is
//     loaded once; swept tiles stream through a kStages-deep cp.async (LDGSTS) ring. cp.async
//     rather than TMA: the ring is filled by the same 128 threads that compute, which keeps the
//     single-warpgroup design (no producer warp, no mbarriers); with 2-3 resident blocks per SM
//     the loads of one block overlap the math of the others. TMA would pay with a producer /
//     consumer split (FlashAttention-3); not done here.
//   - Scores S (64 x 64) = own . swept^T: SS wgmma, both operands K-major in shared memory. The
//     epilogue (scale, masks, online max / sum or probabilities) runs on the accumulator
//     fragments; the (row, column) of each fragment element comes from partitioning an identity
//     tensor the same way as the accumulator.
//   - Backward: acc (64 x D) += P (64 x 64) . swept_tile (64 x D). P is converted to T in
//     registers and used as the A operand (RS wgmma: the accumulator fragment of S is, value for
//     value, the A fragment of the product); swept_tile is read through an MN-major (transposed)
//     view of the same shared-memory tile. acc stays in registers for the whole sweep (D / 2
//     floats per thread) and is written once to this split's slice of the workspace (every
//     element, padded rows and features as 0).
//   - Each wgmma batch is waited for before its registers or shared memory are touched again
//     (warpgroup_wait<0>): no MMA overlaps the epilogue inside a block.
// The device code is compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL) and only with
// CLREG_WITH_WGMMA (CUTLASS headers found at build time); in any other device pass the kernels
// trap, and sweep_wgmma_available() tells the host which code the GPU loads.
// tests/test_cuda_emulation.py emulates this loop structure in float64 (WgmmaSweep).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "clreg.h"
#include "sweep_dispatch.cuh"

// The headers go into every pass (host and device): the host stubs must see every __global__
// declaration that the device passes see.
#if defined(CLREG_WITH_WGMMA)
#include <cute/tensor.hpp>  // first: the atoms below need its declarations
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CLREG_WGMMA_DEVICE 1
#endif
#endif
// WgmmaConfig, and with CuTe the layouts, tiled MMAs and fragment views (shared with the host
// probe scripts/wgmma_layout_probe.cu).
#include "wgmma_layouts.cuh"

namespace clreg {

#ifdef CLREG_WGMMA_DEVICE
namespace wg {
using namespace cute;

template <typename T>
struct CuteElement;
template <>
struct CuteElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// c (=|+)= a . b over all k blocks, one committed wgmma batch, waited for. kRegA: a is a
// register operand (RS), not shared-memory descriptors.
template <bool kZeroInit, bool kRegA, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, TA& a, const TB& b, TC& c) {
  if constexpr (kRegA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(a);
}

template <typename T, int D, SweepMode M>
__device__ __forceinline__ void sweep(const T* __restrict__ own, const T* __restrict__ swept,
                                      const float* __restrict__ lse, const float* __restrict__ w,
                                      float* __restrict__ out, int64_t n_own, int64_t n_swept,
                                      int64_t ld_out, int64_t pair_offset, float scale,
                                      bool fixed_shift, int tiles_per_split,
                                      unsigned char* smem_raw) {
  using E = typename CuteElement<T>::type;
  using C = WgmmaConfig<D>;
  using L = Layouts<E, D, C::kStages>;
  constexpr bool kForward = M == SweepMode::kForward;
  constexpr int kStages = C::kStages;

  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + C::kAlignSlack - 1) &
      ~uintptr_t(C::kAlignSlack - 1));
  E* own_smem = reinterpret_cast<E*>(smem);
  E* ring_smem = reinterpret_cast<E*>(smem + C::kTileBytes);
  float* vec_smem = reinterpret_cast<float*>(smem + C::kTileBytes * (1 + kStages));
  Tensor s_own = make_tensor(make_smem_ptr(own_smem), typename L::Tile{});
  Tensor s_ring = make_tensor(make_smem_ptr(ring_smem), typename L::Ring{});
  Tensor s_ring_t = make_tensor(make_smem_ptr(ring_smem), typename L::RingT{});

  const int tid = threadIdx.x;
  const int64_t own0 = int64_t(blockIdx.x) * kTile;
  const int64_t n_swept_tiles = ceil_div(n_swept, kTile);
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min(tile_begin + tiles_per_split, n_swept_tiles);
  const int n_tiles = static_cast<int>(tile_end - tile_begin);

  // Global -> shared: 128 threads x 16 bytes, 16 rows x 64 features per copy step.
  auto tile_copy = make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, E>{},
                                   Layout<Shape<_16, _8>, Stride<_8, _1>>{},
                                   Layout<Shape<_1, _8>>{});
  auto thr_copy = tile_copy.get_thread_slice(tid);
  auto gmem_tile = [&](const T* base, int64_t row0) {
    return make_tensor(make_gmem_ptr(reinterpret_cast<const E*>(base) + row0 * D),
                       Layout<Shape<Int<kTile>, Int<D>>, Stride<Int<D>, _1>>{});
  };
  auto load_stage = [&](int st, int64_t tile) {
    cute::copy(tile_copy, thr_copy.partition_S(gmem_tile(swept, tile * kTile)),
               thr_copy.partition_D(s_ring(_, _, st)));
    if (M == SweepMode::kCols && tid < 32) {
      // vec[0..63] <- lse, vec[64..127] <- w_rel of the tile's rows (zero-padded by the caller).
      const int c = tid & 15;
      const float* src = (tid < 16 ? lse : w) + tile * kTile + 4 * c;
      float* dst = vec_smem + st * 2 * kTile + (tid < 16 ? 0 : kTile) + 4 * c;
      SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                 *reinterpret_cast<uint128_t*>(dst));
    }
  };

  // Prologue: the owned tile (group 0), then the first kStages - 1 swept tiles (one group each,
  // committed even when empty so that every thread counts the same groups).
  cute::copy(tile_copy, thr_copy.partition_S(gmem_tile(own, own0)), thr_copy.partition_D(s_own));
  cp_async_fence();
  CUTE_UNROLL
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_tiles) load_stage(st, tile_begin + st);
    cp_async_fence();
  }

  MmaScores<E, D> mma_s;
  auto thr_s = mma_s.get_thread_slice(tid);
  Tensor t_own = thr_s.partition_fragment_A(s_own);     // descriptors (MMA, 1, D / 16)
  Tensor t_swept = thr_s.partition_fragment_B(s_ring);  // (MMA, 1, D / 16, stages)
  Tensor t_scores = partition_fragment_C(mma_s, Shape<Int<kTile>, Int<kTile>>{});
  // Fragment coordinates: the identity tensor partitioned like the accumulator.
  Tensor t_coord = thr_s.partition_C(make_identity_tensor(Shape<Int<kTile>, Int<kTile>>{}));
  Tensor scores = make_tensor(t_scores.data(), rows_cols(t_scores.layout()));
  Tensor coord = make_tensor(t_coord.data(), rows_cols(t_coord.layout()));
  constexpr int kRows = size<0>(decltype(scores.layout()){});  // owned rows of this thread: 2
  constexpr int kCols = size<1>(decltype(scores.layout()){});  // columns per row: 16

  int64_t own_row[kRows];
  bool own_ok[kRows];
  float lse_own[kRows];
  CUTE_UNROLL
  for (int m = 0; m < kRows; ++m) {
    own_row[m] = own0 + get<0>(coord(m, 0));
    own_ok[m] = own_row[m] < n_own;
    lse_own[m] = (M == SweepMode::kRows && own_ok[m]) ? __ldg(lse + own_row[m]) : 0.f;
  }

  // Forward: running (max, sum) per owned row over this thread's columns.
  float run_max[kRows], run_sum[kRows];
  CUTE_UNROLL
  for (int m = 0; m < kRows; ++m) {
    run_max[m] = fixed_shift ? scale : -INFINITY;
    run_sum[m] = 0.f;
  }

  // Backward: the block's 64 x D output, in registers for the whole sweep.
  MmaProduct<E, D> mma_o;
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor t_swept_t = thr_o.partition_fragment_B(s_ring_t);  // (MMA, 1, 4, stages)
  auto t_acc = [&] {
    if constexpr (kForward)
      return make_tensor<float>(Shape<_1>{});  // unused
    else
      return partition_fragment_C(mma_o, Shape<Int<kTile>, Int<D>>{});
  }();
  clear(t_acc);

  for (int it = 0; it < n_tiles; ++it) {
    // Groups committed: 1 + (kStages - 1) + it; tile `it` is group 1 + it.
    cp_async_wait<kStages - 2>();
    // This thread's cp.async writes (generic proxy) before the wgmma reads (async proxy), then
    // everyone's: tile `it` complete, and stage (it - 1) % kStages no longer read.
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    {
      const int next = it + kStages - 1;
      if (next < n_tiles) load_stage(next % kStages, tile_begin + next);
      cp_async_fence();
    }
    const int st = it % kStages;
    const int64_t sw0 = (tile_begin + it) * kTile;
    // Masks in tile-local indices: columns < n_valid count, except column diag[m] of owned row
    // m (-1 when the left-out pair is not in this tile).
    const int n_valid = static_cast<int>(min(int64_t(kTile), n_swept - sw0));
    int diag[kRows];
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      const int64_t d = own_row[m] + pair_offset - sw0;
      diag[m] = (d < 0 || d >= kTile) ? -1 : static_cast<int>(d);
    }

    wgmma_gemm<true, false>(mma_s, t_own, t_swept(_, _, _, st), t_scores);

    if constexpr (kForward) {
      CUTE_UNROLL
      for (int m = 0; m < kRows; ++m) {
        float x[kCols];
        CUTE_UNROLL
        for (int n = 0; n < kCols; ++n) {
          const int col = get<1>(coord(m, n));
          x[n] = (col < n_valid && col != diag[m]) ? scale * scores(m, n) : -INFINITY;
        }
        if (!fixed_shift) {
          float tile_max = -INFINITY;
          CUTE_UNROLL
          for (int n = 0; n < kCols; ++n) tile_max = fmaxf(tile_max, x[n]);
          if (tile_max > run_max[m]) {
            run_sum[m] *= expf(run_max[m] - tile_max);  // 0 before the first counted column
            run_max[m] = tile_max;
          }
        }
        if (run_max[m] != -INFINITY) {
          CUTE_UNROLL
          for (int n = 0; n < kCols; ++n) run_sum[m] += expf(x[n] - run_max[m]);
        }
      }
    } else {
      const float* vec = vec_smem + st * 2 * kTile;
      // Probabilities, rounded to T, in the A-operand arrangement of the product.
      Tensor probs = make_tensor<E>(t_scores.layout());
      Tensor probs_rc = make_tensor(probs.data(), rows_cols(probs.layout()));
      CUTE_UNROLL
      for (int m = 0; m < kRows; ++m)
        CUTE_UNROLL
        for (int n = 0; n < kCols; ++n) {
          const int col = get<1>(coord(m, n));
          float p = 0.f;
          if (own_ok[m] && col < n_valid && col != diag[m]) {
            if (M == SweepMode::kRows)
              p = expf(scale * scores(m, n) - lse_own[m]);
            else
              p = vec[kTile + col] * expf(scale * scores(m, n) - vec[col]);
            if (std::is_same<T, __half>::value) p *= kFp16ProbScale;
          }
          probs_rc(m, n) = E(p);
        }
      Tensor probs_a = make_tensor(probs.data(), scores_as_a(probs.layout()));
      static_assert(size<2>(decltype(probs_a.layout()){}) == size<2>(decltype(t_swept_t.layout()){}),
                    "k blocks of the product");
      wgmma_gemm<false, true>(mma_o, probs_a, t_swept_t(_, _, _, st), t_acc);
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block (pending: empty groups)

  if constexpr (kForward) {
    // The four threads of a row are lanes 4g..4g+3 of one warp (wgmma accumulator layout):
    // merge them, then the first writes.
    const int q = tid & 3;
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      float mx = run_max[m], sum = run_sum[m];
      CUTE_UNROLL
      for (int mask = 1; mask <= 2; mask <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, mx, mask);
        const float os = __shfl_xor_sync(0xffffffffu, sum, mask);
        const float nm = fmaxf(mx, om);
        if (nm != -INFINITY) {
          sum = sum * expf(mx - nm) + os * expf(om - nm);
          mx = nm;
        }
      }
      if (q == 0 && own_ok[m])
        out[int64_t(blockIdx.y) * n_own + own_row[m]] =
            (mx == -INFINITY || sum == 0.f) ? -INFINITY : mx + logf(sum);
    }
  } else {
    // Written once: all 64 rows of the block (padded ones hold 0), features < ld_out.
    Tensor t_out_coord = thr_o.partition_C(make_identity_tensor(Shape<Int<kTile>, Int<D>>{}));
    Tensor acc = make_tensor(t_acc.data(), rows_cols(t_acc.layout()));
    Tensor out_coord = make_tensor(t_out_coord.data(), rows_cols(t_out_coord.layout()));
    float* slice = out + int64_t(blockIdx.y) * round_up(n_own, kTile) * ld_out;
    CUTE_UNROLL
    for (int m = 0; m < size<0>(acc); ++m)
      CUTE_UNROLL
      for (int n = 0; n < size<1>(acc); n += 2) {  // (n, n + 1): adjacent columns
        const int row = get<0>(out_coord(m, n));
        const int col = get<1>(out_coord(m, n));
        if (col < ld_out)  // ld_out = round_up(dim, 64) <= D
          *reinterpret_cast<float2*>(slice + (own0 + row) * ld_out + col) =
              make_float2(acc(m, n), acc(m, n + 1));
      }
  }
}

}  // namespace wg
#endif  // CLREG_WGMMA_DEVICE

namespace {

// Grid: (owned tiles, splits); 128 threads (one warpgroup). Arguments as sweep_tc_kernel's.
template <typename T, int D, SweepMode M>
__global__ void __launch_bounds__(kThreads, 1)
sweep_wgmma_kernel(const T* __restrict__ own, const T* __restrict__ swept,
                   const float* __restrict__ lse, const float* __restrict__ w,
                   float* __restrict__ out, int64_t n_own, int64_t n_swept, int64_t ld_out,
                   int64_t pair_offset, float scale, bool fixed_shift, int tiles_per_split) {
#ifdef CLREG_WGMMA_DEVICE
  extern __shared__ __align__(128) unsigned char smem_raw[];
  wg::sweep<T, D, M>(own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset, scale,
                     fixed_shift, tiles_per_split, smem_raw);
#else
  __trap();  // not an sm_90a build: the host checks sweep_wgmma_available() first
#endif
}

// Tells the host which code the GPU loads: only its sm_90a build (the one with the wgmma
// kernels) has static shared memory, at least kProbeMarkerInts ints, which cudaFuncGetAttributes
// reports without a launch (so the probe also works while a stream is being captured).
constexpr int kProbeMarkerInts = 90;
__global__ void sweep_wgmma_probe_kernel(int* out) {
#ifdef CLREG_WGMMA_DEVICE
  __shared__ volatile int marker[kProbeMarkerInts];
  if (threadIdx.x < kProbeMarkerInts) marker[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) *out = marker[kProbeMarkerInts - 1];
#else
  if (threadIdx.x == 0) *out = 0;
#endif
}

template <typename T, int D, SweepMode M>
cudaError_t launch_one(const void* own, const void* swept, const float* lse, const float* w,
                       float* out, int64_t n_own, int64_t n_swept, int64_t ld_out,
                       int64_t pair_offset, float scale, bool fixed_shift, int n_splits,
                       int tiles_per_split, cudaStream_t stream) {
  using C = WgmmaConfig<D>;
  auto kernel = sweep_wgmma_kernel<T, D, M>;
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

cudaError_t sweep_wgmma_available(int device, bool* available) {
  *available = false;
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  if (major != 9 || minor != 0) return cudaSuccess;  // sm_90a code runs on CC 9.0 only
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, sweep_wgmma_probe_kernel);  // for the current device
  if (err != cudaSuccess) return err;
  // (ptxas may round the marker up: 384 bytes for 360; the other builds have none)
  *available = attr.sharedSizeBytes >= kProbeMarkerInts * sizeof(int);
  return cudaSuccess;
}

cudaError_t launch_sweep_wgmma(SweepMode mode, const void* own, const void* swept,
                               const float* lse, const float* w, float* out, int64_t n_own,
                               int64_t n_swept, int64_t ld_out, int64_t pair_offset, float scale,
                               bool fixed_shift, int dim_pad, int n_splits, int tiles_per_split,
                               DotType dot, cudaStream_t stream) {
  if (dot == DotType::kFloat32 || (dim_pad != 64 && dim_pad != 128 && dim_pad != 256) ||
      ld_out > dim_pad)
    return cudaErrorInvalidValue;
  return dispatch_dot_dim_mode(dot, dim_pad, mode, [&](auto t, auto d, auto m) {
    return launch_one<decltype(t), decltype(d)::value, decltype(m)::value>(
        own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset, scale, fixed_shift,
        n_splits, tiles_per_split, stream);
  });
}

int resident_blocks_sweep_wgmma(SweepMode mode, DotType dot, int dim_pad) {
  if (dot == DotType::kFloat32) return 0;
  return dispatch_dot_dim_mode(dot, dim_pad, mode, [](auto t, auto d, auto m) {
    return resident_blocks_of(
        sweep_wgmma_kernel<decltype(t), decltype(d)::value, decltype(m)::value>, kThreads,
        WgmmaConfig<decltype(d)::value>::kSmemBytes);
  });
}

}  // namespace clreg

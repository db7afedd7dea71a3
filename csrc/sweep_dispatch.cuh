// Host helpers shared by the three sweep files (sweep_tc.cu, sweep_simt.cu, sweep_wgmma.cu):
// the runtime (dot type, padded dim, mode) mapped to the kernels' template arguments, and the
// occupancy query of one instantiation.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "clreg.h"

namespace clreg {

template <int D>
using DimConstant = std::integral_constant<int, D>;
template <SweepMode M>
using ModeConstant = std::integral_constant<SweepMode, M>;

// f(DimConstant<D>(), ModeConstant<M>()) for dim_pad in {64, 128, 256} (the launchers check it).
template <typename F>
auto dispatch_dim_mode(int dim_pad, SweepMode mode, F&& f) {
  auto by_mode = [&](auto d) {
    switch (mode) {
      case SweepMode::kForward: return f(d, ModeConstant<SweepMode::kForward>());
      case SweepMode::kRows: return f(d, ModeConstant<SweepMode::kRows>());
      case SweepMode::kCols:
      default: return f(d, ModeConstant<SweepMode::kCols>());
    }
  };
  switch (dim_pad) {
    case 64: return by_mode(DimConstant<64>());
    case 128: return by_mode(DimConstant<128>());
    case 256:
    default: return by_mode(DimConstant<256>());
  }
}

// f(T(), DimConstant<D>(), ModeConstant<M>()) with T = __half for float16, else __nv_bfloat16.
template <typename F>
auto dispatch_dot_dim_mode(DotType dot, int dim_pad, SweepMode mode, F&& f) {
  if (dot == DotType::kFloat16)
    return dispatch_dim_mode(dim_pad, mode, [&](auto d, auto m) { return f(__half(), d, m); });
  return dispatch_dim_mode(dim_pad, mode,
                           [&](auto d, auto m) { return f(__nv_bfloat16(), d, m); });
}

// Resident blocks per SM of `kernel` with `smem_bytes` of dynamic shared memory (occupancy
// API), 0 when it cannot tell.
template <typename Kernel>
int resident_blocks_of(Kernel kernel, int threads, int smem_bytes) {
  int n = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem_bytes) !=
          cudaSuccess) {
    cudaGetLastError();  // clear the error of the failed query
    return 0;
  }
  return n;
}

}  // namespace clreg

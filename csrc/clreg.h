// Declarations shared by the CUDA kernels (*.cu) and the PyTorch glue (bindings.cpp).
//
// The launchers take raw pointers and a stream so that the .cu files need no PyTorch headers
// (faster nvcc builds); bindings.cpp checks the tensors, allocates outputs and workspaces and
// turns the returned cudaError_t into a Python exception.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace clreg {

// Element type of the tile products. Float32 tiles use SIMT fp32 FMAs (no TF32); bf16/fp16
// tiles are rounded in shared memory and multiplied on tensor cores (WMMA, fp32 accumulate).
enum class DotType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every kernel works on 64 x 64 tiles of the similarity matrix with 128 threads (4 warps).
constexpr int kTile = 64;
constexpr int kThreads = 128;

// fp16 probability tiles are stored times 2^12 (Pr <= 1, so at most 4096 < 65504): small
// probabilities stay normal fp16 numbers instead of losing bits as subnormals. The workspaces
// then hold 2^12 times the sums and the caller divides (exactly, a power of two).
constexpr float kFp16ProbScale = 4096.f;

// Callable from host and device code (this header is also read by the C++ compiler).
#ifdef __CUDACC__
#define CLREG_HOST_DEVICE __host__ __device__
#else
#define CLREG_HOST_DEVICE
#endif

CLREG_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Workspaces are padded to whole tiles in both dimensions so that the kernels can read and
// write whole 64 x 64 accumulator blocks without bounds checks.
CLREG_HOST_DEVICE inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// lse_partial: (n_splits, n_anchor) float32. Split s covers the column tiles
// [s * tiles_per_split, (s + 1) * tiles_per_split) and writes the log-sum-exp over its columns
// (-inf when none counts); the caller combines the splits with a log-sum-exp.
// fixed_shift: accumulate exp(scale * s - scale) (safe for scale <= ~40 since s >= -1);
// otherwise keep a running maximum per row.
cudaError_t launch_lse_forward(const float* za, const float* zc, float* lse_partial,
                               int64_t n_anchor, int64_t n_col, int64_t dim, int64_t self_offset,
                               float scale, bool fixed_shift, int n_splits, int tiles_per_split,
                               DotType dot, cudaStream_t stream);

// Row pass of the backward: acc_rows (n_splits, round_up(n_anchor, 64), round_up(dim, 64)),
// zero-filled by the caller, gets sum_c Pr_ic zc_c for the column tiles of each split, with
// Pr_ic = exp(scale * za_i . zc_c - lse_i) (0 on the left-out pair). The caller multiplies by
// scale * w_i (and 1 / kFp16ProbScale for fp16) and sums the splits.
cudaError_t launch_lse_backward_rows(const float* za, const float* zc, const float* lse,
                                     float* acc_rows, int64_t n_anchor, int64_t n_col,
                                     int64_t dim, int64_t self_offset, float scale, int n_splits,
                                     int tiles_per_split, DotType dot, cudaStream_t stream);

// Column pass: acc_cols (n_splits, round_up(n_grad_cols, 64), round_up(dim, 64)), zero-filled,
// gets sum_i w_rel_i Pr_ic za_i for the first n_grad_cols columns, over the anchor tiles of each
// split. w_rel = w / max|w| keeps the fp16/bf16 tiles in range; the caller multiplies by
// scale * max|w| (and 1 / kFp16ProbScale for fp16) and sums the splits.
cudaError_t launch_lse_backward_cols(const float* za, const float* zc, const float* lse,
                                     const float* w_rel, float* acc_cols, int64_t n_anchor,
                                     int64_t n_col, int64_t n_grad_cols, int64_t dim,
                                     int64_t self_offset, float scale, int n_splits,
                                     int tiles_per_split, DotType dot, cudaStream_t stream);

// Tensor-core sweep (sweep_tc.cu; sm_80+: cp.async pipeline, mma.sync, register-resident
// accumulators) for fp16/bf16. `own` and `swept` are the operands already rounded to `dot` and
// zero-padded to (round_up(n, 64), dim_pad) with dim_pad = sweep_tc_dim(dim); the pair
// swept == own + pair_offset is left out.
//   kForward: own = anchors, swept = columns; out = lse_partial (n_splits, n_own), as above.
//   kRows:    own = anchors, swept = columns, lse of the anchors; out = acc_rows as above
//             (every element of every slice is written: no zero fill needed).
//   kCols:    own = gradient columns, swept = anchors, lse and w_rel of the anchors,
//             pair_offset = -self_offset; out = acc_cols as above (every element written).
// ld_out = round_up(dim, 64) is the workspace's row stride (unused by kForward).
enum class SweepMode : int { kForward = 0, kRows = 1, kCols = 2 };
constexpr int kSweepMaxDim = 256;
// 64, 128 or 256: the padded feature size of the sweep kernels for `dim`; 0 when dim > 256.
int sweep_tc_dim(int64_t dim);
cudaError_t launch_sweep_tc(SweepMode mode, const void* own, const void* swept, const float* lse,
                            const float* w, float* out, int64_t n_own, int64_t n_swept,
                            int64_t ld_out, int64_t pair_offset, float scale, bool fixed_shift,
                            int dim_pad, int n_splits, int tiles_per_split, DotType dot,
                            cudaStream_t stream);
int resident_blocks_sweep_tc(SweepMode mode, DotType dot, int dim_pad);

// Hopper sweep (sweep_wgmma.cu; sm_90a: wgmma on CuTe GMMA atoms, built with -DCLREG_WITH_WGMMA
// when the CUTLASS headers are found): the same modes, arguments and outputs as
// launch_sweep_tc. Only for a device where sweep_wgmma_available() says so: it asks which code
// the GPU loads (the sm_90a cubin with the wgmma kernels, or not), for the current device.
cudaError_t sweep_wgmma_available(int device, bool* available);
cudaError_t launch_sweep_wgmma(SweepMode mode, const void* own, const void* swept,
                               const float* lse, const float* w, float* out, int64_t n_own,
                               int64_t n_swept, int64_t ld_out, int64_t pair_offset, float scale,
                               bool fixed_shift, int dim_pad, int n_splits, int tiles_per_split,
                               DotType dot, cudaStream_t stream);
int resident_blocks_sweep_wgmma(SweepMode mode, DotType dot, int dim_pad);
// Float32 sweep (sweep_simt.cu; sm_80+: cp.async ring, SIMT fp32 FMAs, register-resident
// accumulators), the same passes and outputs as launch_sweep_tc, for dim <= kSweepMaxDim.
// `own` and `swept` are the caller's float32 rows, ld_own / ld_swept floats apart (multiples of
// 4, 16-byte aligned bases: cudaErrorInvalidValue otherwise); features past `dim` and rows past
// the end are read as zeros. dim_pad = sweep_tc_dim(dim).
cudaError_t launch_sweep_simt(SweepMode mode, const float* own, int64_t ld_own,
                              const float* swept, int64_t ld_swept, int64_t dim, const float* lse,
                              const float* w, float* out, int64_t n_own, int64_t n_swept,
                              int64_t ld_out, int64_t pair_offset, float scale, bool fixed_shift,
                              int dim_pad, int n_splits, int tiles_per_split,
                              cudaStream_t stream);
int resident_blocks_sweep_simt(SweepMode mode, int dim_pad);

// Resident blocks per SM of the kernel that the launcher above runs for `dot` (occupancy API;
// 0 when the runtime cannot tell). The split policy (splits.h) aims at full GPUs with it.
int resident_blocks_lse_forward(DotType dot);
int resident_blocks_lse_backward_rows(DotType dot);
int resident_blocks_lse_backward_cols(DotType dot);

}  // namespace clreg

// PyTorch glue for the CUDA kernels: tensor checks, workspaces, split sizes, the reduction of
// the splits and the pybind11 module clreg_fast._C. The contract of the two functions is the
// one of clreg_fast/backends/base.py (lse_forward, lse_backward).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include "clreg.h"
#include "clreg_torch.h"
#include "splits.h"

namespace clreg {
namespace {

// Below this temperature exp(-2 / tau) leaves the normal float32 range and the fixed shift of
// 1/tau could underflow whole rows; the kernels then keep a running maximum instead.
constexpr double kMaxFixedShiftScale = 40.0;
// The split policy (clreg::choose_splits) lives in splits.h; the kernels' occupancy decides how
// many blocks make the GPU full.

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "clreg_fast._C: launch of ", what,
              " failed: ", cudaGetErrorString(err));
}

DotType parse_dot(const std::string& name) {
  if (name == "float32") return DotType::kFloat32;
  if (name == "float16") return DotType::kFloat16;
  if (name == "bfloat16") return DotType::kBFloat16;
  TORCH_CHECK_VALUE(false, "dot_dtype must be 'float32', 'float16' or 'bfloat16', got '", name,
                    "'");
  return DotType::kFloat32;  // unreachable
}

void check_features(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, name,
                   " must be float32 (normalized features), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
}

void check_row_vector(const torch::Tensor& t, const char* name, const torch::Tensor& za) {
  TORCH_CHECK_VALUE(t.device() == za.device(), name, " is on ", t.device(), " but za is on ",
                    za.device());
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == za.size(0), name, " must have shape (",
                    za.size(0), ",), got ", t.sizes());
}

void check_pair(const torch::Tensor& za, const torch::Tensor& zc) {
  check_features(za, "za");
  check_features(zc, "zc");
  TORCH_CHECK_VALUE(zc.device() == za.device(), "zc is on ", zc.device(), " but za is on ",
                    za.device());
  TORCH_CHECK_VALUE(zc.size(1) == za.size(1), "za and zc must have the same feature size, got ",
                    za.size(1), " and ", zc.size(1));
}

int multiprocessors(int device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  return std::max(count, 1);
}

// Splits for a launch on `device` of a kernel with `blocks_per_sm` resident blocks per SM (from
// the occupancy API; 0 when it could not tell, then 4 is assumed).
Splits splits_for(int64_t n_blocks, int64_t n_swept_tiles, int64_t slice_elements,
                  int blocks_per_sm, int device) {
  return choose_splits(n_blocks, n_swept_tiles, slice_elements, multiprocessors(device),
                       blocks_per_sm > 0 ? blocks_per_sm : 4);
}

// Which loops run (CLREG_FAST_CUDA_LOOPS):
//   auto (or unset, or "sweep"): the register-resident sweeps up to 256 features: for fp16/bf16
//     the Hopper wgmma sweep (sweep_wgmma.cu) on a device that runs its sm_90a code, else the
//     sm_80 mma.sync sweep (sweep_tc.cu); for float32 the SIMT sweep (sweep_simt.cu,
//     use_sweep_simt); the SIMT / WMMA tile kernels (lse_forward.cu, lse_backward.cu) otherwise;
//   wgmma: as auto, but an error where the wgmma sweep cannot run for fp16/bf16 (tests,
//     benchmarks);
//   sm80:  the mma.sync sweep for fp16/bf16 even on Hopper;
//   legacy: the SIMT / WMMA tile kernels everywhere (the previous kernels, kept for comparison
//     and as a fallback).
// The variable is checked on every call, whatever the dtype, so that a misspelt value fails
// at once instead of only on the first fp16/bf16 call.
enum class Loops { kLegacy, kSweepSm80, kWgmma };

const char* loops_name(Loops loops) {
  switch (loops) {
    case Loops::kWgmma: return "wgmma";
    case Loops::kSweepSm80: return "sweep";
    case Loops::kLegacy:
    default: return "legacy";
  }
}

#ifdef CLREG_WITH_WGMMA
constexpr bool kWgmmaBuilt = true;
#else
constexpr bool kWgmmaBuilt = false;
#endif

// Whether `device` runs the wgmma kernels (a CC 9.0 GPU loading this module's sm_90a code);
// asked once per device (sweep_wgmma_available: the attributes of a probe kernel, no launch).
bool wgmma_available(int device) {
#ifdef CLREG_WITH_WGMMA
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not probed, 1: no, 2: yes
  if (device < 0 || device >= kMaxDevices) return false;
  int state = known[device].load();
  if (state == 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    bool available = false;
    check_launch(sweep_wgmma_available(device, &available),
                 "cudaFuncGetAttributes(sweep_wgmma_probe_kernel)");
    state = available ? 2 : 1;
    known[device].store(state);
  }
  return state == 2;
#else
  (void)device;
  return false;
#endif
}

Loops choose_loops(DotType dot, int64_t dim, int device) {
  const char* env = std::getenv("CLREG_FAST_CUDA_LOOPS");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK_VALUE(value.empty() || value == "auto" || value == "sweep" || value == "wgmma" ||
                        value == "sm80" || value == "legacy",
                    "CLREG_FAST_CUDA_LOOPS must be 'auto', 'sweep', 'wgmma', 'sm80' or 'legacy', "
                    "got '", value, "'");
  if (dot == DotType::kFloat32 || sweep_tc_dim(dim) == 0 || value == "legacy")
    return Loops::kLegacy;
  if (value == "sm80") return Loops::kSweepSm80;
  const bool wgmma = wgmma_available(device);
  TORCH_CHECK(wgmma || value != "wgmma", "CLREG_FAST_CUDA_LOOPS=wgmma, but the wgmma sweep ",
              kWgmmaBuilt ? "does not run on this device (it needs compute capability 9.0 and "
                            "the module's sm_90a code)"
                          : "was not built (no CUTLASS headers at build time)");
  return wgmma ? Loops::kWgmma : Loops::kSweepSm80;
}

cudaError_t launch_sweep(Loops loops, SweepMode mode, const void* own, const void* swept,
                         const float* lse, const float* w, float* out, int64_t n_own,
                         int64_t n_swept, int64_t ld_out, int64_t pair_offset, float scale,
                         bool fixed_shift, int dim_pad, int n_splits, int tiles_per_split,
                         DotType dot, cudaStream_t stream) {
#ifdef CLREG_WITH_WGMMA
  if (loops == Loops::kWgmma)
    return launch_sweep_wgmma(mode, own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset,
                              scale, fixed_shift, dim_pad, n_splits, tiles_per_split, dot,
                              stream);
#endif
  return launch_sweep_tc(mode, own, swept, lse, w, out, n_own, n_swept, ld_out, pair_offset,
                         scale, fixed_shift, dim_pad, n_splits, tiles_per_split, dot, stream);
}

int resident_blocks_sweep(Loops loops, SweepMode mode, DotType dot, int dim_pad) {
#ifdef CLREG_WITH_WGMMA
  if (loops == Loops::kWgmma) return resident_blocks_sweep_wgmma(mode, dot, dim_pad);
#endif
  return resident_blocks_sweep_tc(mode, dot, dim_pad);
}

// The float32 sweep (sweep_simt.cu) for float32 up to 256 features, unless
// CLREG_FAST_CUDA_LOOPS=legacy (then the SIMT tile kernels). Called after choose_loops, which
// checks the variable's value.
bool use_sweep_simt(DotType dot, int64_t dim) {
  const char* env = std::getenv("CLREG_FAST_CUDA_LOOPS");
  return dot == DotType::kFloat32 && sweep_tc_dim(dim) != 0 &&
         !(env != nullptr && std::string(env) == "legacy");
}

// z (contiguous float32) as the float32 sweep reads it, in whole 16-byte chunks: z itself when
// its rows are (dim % 4 == 0, 16-byte aligned), else a copy with rows zero-padded to
// round_up(dim, 4). The row stride to pass is the result's size(1), not its stride(0): torch
// counts a one-row tensor as contiguous whatever its stride(0) (1 for a transposed column).
torch::Tensor simt_operand(const torch::Tensor& z) {
  if (z.size(1) % 4 == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % 16 == 0) return z;
  auto out = torch::zeros({z.size(0), round_up(z.size(1), 4)}, z.options());
  out.narrow(1, 0, z.size(1)).copy_(z);
  return out;
}

// z (float32) rounded to the dot type once, zero-padded to (round_up(rows, 64), dim_pad).
torch::Tensor rounded_padded(const torch::Tensor& z, int64_t dim_pad, DotType dot) {
  const auto type = dot == DotType::kFloat16 ? torch::kFloat16 : torch::kBFloat16;
  auto out = torch::zeros({round_up(z.size(0), kTile), dim_pad}, z.options().dtype(type));
  out.narrow(0, 0, z.size(0)).narrow(1, 0, z.size(1)).copy_(z);
  return out;
}

torch::Tensor zero_padded(const torch::Tensor& v) {
  auto out = torch::zeros({round_up(v.size(0), kTile)}, v.options());
  out.narrow(0, 0, v.size(0)).copy_(v);
  return out;
}

}  // namespace

torch::Tensor lse_forward(torch::Tensor za, torch::Tensor zc, int64_t self_offset, double scale,
                          const std::string& dot_dtype) {
  check_pair(za, zc);
  const DotType dot = parse_dot(dot_dtype);
  za = za.contiguous();
  zc = zc.contiguous();
  const int64_t n_anchor = za.size(0), n_col = zc.size(0), dim = za.size(1);
  auto options = za.options().dtype(torch::kFloat32);
  if (n_anchor == 0) return torch::empty({0}, options);
  if (n_col == 0) return torch::full({n_anchor}, -std::numeric_limits<float>::infinity(), options);

  const c10::cuda::CUDAGuard guard(za.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(za.get_device()).stream();
  const bool fixed_shift = scale <= kMaxFixedShiftScale;
  const Loops loops = choose_loops(dot, dim, za.get_device());
  if (loops != Loops::kLegacy) {
    const int dim_tc = sweep_tc_dim(dim);
    const Splits splits =
        splits_for(ceil_div(n_anchor, kTile), ceil_div(n_col, kTile), n_anchor,
                   resident_blocks_sweep(loops, SweepMode::kForward, dot, dim_tc),
                   za.get_device());
    auto own = rounded_padded(za, dim_tc, dot);
    auto swept = rounded_padded(zc, dim_tc, dot);
    auto partial = torch::empty({splits.count, n_anchor}, options);
    check_launch(launch_sweep(loops, SweepMode::kForward, own.data_ptr(), swept.data_ptr(),
                              nullptr, nullptr, partial.data_ptr<float>(), n_anchor, n_col, 0,
                              self_offset, static_cast<float>(scale), fixed_shift, dim_tc,
                              splits.count, splits.tiles_per_split, dot, stream),
                 loops == Loops::kWgmma ? "sweep_wgmma_kernel (forward)"
                                        : "sweep_tc_kernel (forward)");
    if (splits.count == 1) return partial.select(0, 0);
    return torch::logsumexp(partial, 0);
  }
  if (use_sweep_simt(dot, dim)) {
    const int dim_s = sweep_tc_dim(dim);
    const Splits splits =
        splits_for(ceil_div(n_anchor, kTile), ceil_div(n_col, kTile), n_anchor,
                   resident_blocks_sweep_simt(SweepMode::kForward, dim_s), za.get_device());
    auto own = simt_operand(za);
    auto swept = simt_operand(zc);
    auto partial = torch::empty({splits.count, n_anchor}, options);
    check_launch(launch_sweep_simt(SweepMode::kForward, own.data_ptr<float>(), own.size(1),
                                   swept.data_ptr<float>(), swept.size(1), dim, nullptr,
                                   nullptr, partial.data_ptr<float>(), n_anchor, n_col, 0,
                                   self_offset, static_cast<float>(scale), fixed_shift, dim_s,
                                   splits.count, splits.tiles_per_split, stream),
                 "sweep_simt_kernel (forward)");
    if (splits.count == 1) return partial.select(0, 0);
    return torch::logsumexp(partial, 0);
  }
  const Splits splits = splits_for(ceil_div(n_anchor, kTile), ceil_div(n_col, kTile), n_anchor,
                                   resident_blocks_lse_forward(dot), za.get_device());
  auto partial = torch::empty({splits.count, n_anchor}, options);
  check_launch(launch_lse_forward(za.data_ptr<float>(), zc.data_ptr<float>(),
                                  partial.data_ptr<float>(), n_anchor, n_col, dim, self_offset,
                                  static_cast<float>(scale), fixed_shift, splits.count, splits.tiles_per_split, dot, stream),
               "lse_forward_kernel");
  if (splits.count == 1) return partial.select(0, 0);
  return torch::logsumexp(partial, 0);
}

std::tuple<torch::Tensor, torch::Tensor> lse_backward(torch::Tensor za, torch::Tensor zc,
                                                      torch::Tensor lse, torch::Tensor w,
                                                      int64_t self_offset, double scale,
                                                      int64_t n_grad_cols,
                                                      const std::string& dot_dtype,
                                                      bool need_dza) {
  check_pair(za, zc);
  check_row_vector(lse, "lse", za);
  check_row_vector(w, "w", za);
  const DotType dot = parse_dot(dot_dtype);
  const int64_t n_anchor = za.size(0), n_col = zc.size(0), dim = za.size(1);
  TORCH_CHECK_VALUE(n_grad_cols >= 0 && n_grad_cols <= n_col, "n_grad_cols must be in [0, ",
                    n_col, "], got ", n_grad_cols);
  za = za.contiguous();
  zc = zc.contiguous();
  lse = lse.contiguous();
  w = w.contiguous();
  auto options = za.options().dtype(torch::kFloat32);
  if (n_anchor == 0 || n_col == 0 || (!need_dza && n_grad_cols == 0)) {  // nothing to sweep
    return {torch::zeros({need_dza ? n_anchor : 0, dim}, options),
            torch::zeros({n_grad_cols, dim}, options)};
  }

  const c10::cuda::CUDAGuard guard(za.device());
  const int device = za.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const float scale_f = static_cast<float>(scale);
  const int64_t dim_pad = round_up(dim, kTile);
  const int64_t n_anchor_tiles = ceil_div(n_anchor, kTile);
  const int64_t n_col_tiles = ceil_div(n_col, kTile);

  // fp16 tiles held the probabilities times kFp16ProbScale; undo it with the other factors.
  const float tile_scale = dot == DotType::kFloat16 ? 1.f / kFp16ProbScale : 1.f;
  // Tensor-core sweep: both passes share the operands, rounded and padded once.
  const Loops loops = choose_loops(dot, dim, device);
  const bool tc = loops != Loops::kLegacy;
  const char* const rows_name =
      loops == Loops::kWgmma ? "sweep_wgmma_kernel (rows)" : "sweep_tc_kernel (rows)";
  const char* const cols_name =
      loops == Loops::kWgmma ? "sweep_wgmma_kernel (cols)" : "sweep_tc_kernel (cols)";
  const int dim_tc = tc ? sweep_tc_dim(dim) : 0;
  torch::Tensor za_tc, zc_tc;
  if (tc) {
    za_tc = rounded_padded(za, dim_tc, dot);
    zc_tc = rounded_padded(zc, dim_tc, dot);
  }
  // Float32 sweep: the operands as they are (or rows padded to whole 16-byte chunks).
  const bool simt = !tc && use_sweep_simt(dot, dim);
  const int dim_s = simt ? sweep_tc_dim(dim) : 0;
  torch::Tensor za_s, zc_s;
  if (simt) {
    za_s = simt_operand(za);
    zc_s = simt_operand(zc);
  }

  // Row pass: dza_i = scale * w_i * sum_c Pr_ic zc_c (skipped when the caller drops dza).
  torch::Tensor dza = torch::zeros({0, dim}, options);
  if (need_dza) {
    const Splits row_splits =
        splits_for(n_anchor_tiles, n_col_tiles, n_anchor_tiles * kTile * dim_pad,
                   tc     ? resident_blocks_sweep(loops, SweepMode::kRows, dot, dim_tc)
                   : simt ? resident_blocks_sweep_simt(SweepMode::kRows, dim_s)
                          : resident_blocks_lse_backward_rows(dot),
                   device);
    torch::Tensor acc_rows;
    if (tc) {  // the kernel writes every element of every slice: no zero fill
      acc_rows = torch::empty({row_splits.count, n_anchor_tiles * kTile, dim_pad}, options);
      check_launch(launch_sweep(loops, SweepMode::kRows, za_tc.data_ptr(), zc_tc.data_ptr(),
                                lse.data_ptr<float>(), nullptr, acc_rows.data_ptr<float>(),
                                n_anchor, n_col, dim_pad, self_offset, scale_f, false, dim_tc,
                                row_splits.count, row_splits.tiles_per_split, dot, stream),
                   rows_name);
    } else if (simt) {  // every element written here too
      acc_rows = torch::empty({row_splits.count, n_anchor_tiles * kTile, dim_pad}, options);
      check_launch(launch_sweep_simt(SweepMode::kRows, za_s.data_ptr<float>(), za_s.size(1),
                                     zc_s.data_ptr<float>(), zc_s.size(1), dim,
                                     lse.data_ptr<float>(), nullptr, acc_rows.data_ptr<float>(),
                                     n_anchor, n_col, dim_pad, self_offset, scale_f, false, dim_s,
                                     row_splits.count, row_splits.tiles_per_split, stream),
                   "sweep_simt_kernel (rows)");
    } else {
      acc_rows = torch::zeros({row_splits.count, n_anchor_tiles * kTile, dim_pad}, options);
      check_launch(
          launch_lse_backward_rows(za.data_ptr<float>(), zc.data_ptr<float>(),
                                   lse.data_ptr<float>(), acc_rows.data_ptr<float>(), n_anchor,
                                   n_col, dim, self_offset, scale_f, row_splits.count,
                                   row_splits.tiles_per_split, dot, stream),
          "lse_backward_rows_kernel");
    }
    auto rows = row_splits.count == 1 ? acc_rows.select(0, 0) : acc_rows.sum(0);
    dza = rows.narrow(0, 0, n_anchor).narrow(1, 0, dim) *
          (w * (scale_f * tile_scale)).unsqueeze(1);
  }

  if (n_grad_cols == 0) return {dza, torch::zeros({0, dim}, options)};

  // Column pass: dzc_c = scale * sum_i w_i Pr_ic za_i, with w rescaled to [-1, 1] so that the
  // fp16/bf16 probability tiles neither overflow nor flush small weights to zero.
  auto w_max = w.abs().max().clamp_min(1e-30);  // stays on the device: no host sync
  auto w_rel = (w / w_max).contiguous();
  const int64_t n_grad_tiles = ceil_div(n_grad_cols, kTile);
  const Splits col_splits =
      splits_for(n_grad_tiles, n_anchor_tiles, n_grad_tiles * kTile * dim_pad,
                 tc     ? resident_blocks_sweep(loops, SweepMode::kCols, dot, dim_tc)
                 : simt ? resident_blocks_sweep_simt(SweepMode::kCols, dim_s)
                        : resident_blocks_lse_backward_cols(dot),
                 device);
  torch::Tensor acc_cols;
  if (tc) {
    // The kernel stages lse and w_rel of whole anchor tiles: padded with zeros.
    auto lse_pad = zero_padded(lse);
    auto w_pad = zero_padded(w_rel);
    acc_cols = torch::empty({col_splits.count, n_grad_tiles * kTile, dim_pad}, options);
    check_launch(launch_sweep(loops, SweepMode::kCols, zc_tc.data_ptr(), za_tc.data_ptr(),
                              lse_pad.data_ptr<float>(), w_pad.data_ptr<float>(),
                              acc_cols.data_ptr<float>(), n_grad_cols, n_anchor, dim_pad,
                              -self_offset, scale_f, false, dim_tc, col_splits.count,
                              col_splits.tiles_per_split, dot, stream),
                 cols_name);
  } else if (simt) {
    // The kernel stages lse and w_rel of whole anchor tiles: padded with zeros.
    auto lse_pad = zero_padded(lse);
    auto w_pad = zero_padded(w_rel);
    acc_cols = torch::empty({col_splits.count, n_grad_tiles * kTile, dim_pad}, options);
    check_launch(launch_sweep_simt(SweepMode::kCols, zc_s.data_ptr<float>(), zc_s.size(1),
                                   za_s.data_ptr<float>(), za_s.size(1), dim,
                                   lse_pad.data_ptr<float>(), w_pad.data_ptr<float>(),
                                   acc_cols.data_ptr<float>(), n_grad_cols, n_anchor, dim_pad,
                                   -self_offset, scale_f, false, dim_s, col_splits.count,
                                   col_splits.tiles_per_split, stream),
                 "sweep_simt_kernel (cols)");
  } else {
    acc_cols = torch::zeros({col_splits.count, n_grad_tiles * kTile, dim_pad}, options);
    check_launch(launch_lse_backward_cols(za.data_ptr<float>(), zc.data_ptr<float>(),
                                          lse.data_ptr<float>(), w_rel.data_ptr<float>(),
                                          acc_cols.data_ptr<float>(), n_anchor, n_col,
                                          n_grad_cols, dim, self_offset, scale_f,
                                          col_splits.count, col_splits.tiles_per_split, dot,
                                          stream),
                 "lse_backward_cols_kernel");
  }
  auto cols = col_splits.count == 1 ? acc_cols.select(0, 0) : acc_cols.sum(0);
  auto dzc = cols.narrow(0, 0, n_grad_cols).narrow(1, 0, dim) * (w_max * (scale_f * tile_scale));
  return {dza, dzc};
}

}  // namespace clreg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clreg_fast CUDA kernels: fused similarity / log-sum-exp forward and backward";
  m.def("lse_forward", &clreg::lse_forward, "Per-anchor log-sum-exp of scaled similarities",
        pybind11::arg("za"), pybind11::arg("zc"), pybind11::arg("self_offset"),
        pybind11::arg("scale"), pybind11::arg("dot_dtype"));
  m.def("lse_backward", &clreg::lse_backward,
        "Gradients of sum_i w_i lse_i w.r.t. za and the first n_grad_cols rows of zc",
        pybind11::arg("za"), pybind11::arg("zc"), pybind11::arg("lse"), pybind11::arg("w"),
        pybind11::arg("self_offset"), pybind11::arg("scale"), pybind11::arg("n_grad_cols"),
        pybind11::arg("dot_dtype"), pybind11::arg("need_dza") = true);
  m.def(
      "choose_splits",
      [](int64_t n_blocks, int64_t n_swept_tiles, int64_t slice_elements, int64_t multiprocessors,
         int64_t blocks_per_sm) {
        const clreg::Splits s = clreg::choose_splits(n_blocks, n_swept_tiles, slice_elements,
                                                     multiprocessors, blocks_per_sm);
        return std::make_tuple(s.count, s.tiles_per_split);
      },
      "The split policy of csrc/splits.h: (count, tiles_per_split); mirrored in "
      "clreg_fast/backends/cuda/splits.py",
      pybind11::arg("n_blocks"), pybind11::arg("n_swept_tiles"), pybind11::arg("slice_elements"),
      pybind11::arg("multiprocessors"), pybind11::arg("blocks_per_sm"));
  m.def(
      "loops",
      [](const std::string& dot_dtype, int64_t dim, int64_t device) {
        if (device < 0) device = c10::cuda::current_device();
        const clreg::DotType dot = clreg::parse_dot(dot_dtype);
        // choose_loops first: it checks the variable's value.
        const clreg::Loops loops = clreg::choose_loops(dot, dim, static_cast<int>(device));
        if (loops == clreg::Loops::kLegacy && clreg::use_sweep_simt(dot, dim)) return "sweep";
        return clreg::loops_name(loops);
      },
      "Which kernels run for this dot dtype and feature size on `device` (-1: the current one): "
      "'wgmma' (Hopper sweep, sweep_wgmma.cu), 'sweep' (register-resident sweep: sweep_tc.cu for "
      "fp16/bf16, sweep_simt.cu for float32) or 'legacy' (lse_forward.cu / lse_backward.cu); "
      "reads CLREG_FAST_CUDA_LOOPS",
      pybind11::arg("dot_dtype"), pybind11::arg("dim"), pybind11::arg("device") = -1);
  m.def(
      "wgmma_available",
      [](int64_t device) {
        if (device < 0) device = c10::cuda::current_device();
        return clreg::wgmma_available(static_cast<int>(device));
      },
      "Whether `device` (-1: the current one) runs the wgmma sweep: built (wgmma_built) and a "
      "compute capability 9.0 GPU that loads the module's sm_90a code (probed once)",
      pybind11::arg("device") = -1);
  m.attr("wgmma_built") = clreg::kWgmmaBuilt;
  m.attr("tile_size") = clreg::kTile;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
}

// Tensor-level entry points of the CUDA kernels, defined in bindings.cpp: the pybind11 module
// and the TORCH_LIBRARY registration (torch_ops.cpp) both call them. The contract is the one of
// clreg_fast/backends/base.py (lse_forward, lse_backward).
#pragma once

#include <string>
#include <tuple>

#include <torch/types.h>

namespace clreg {

torch::Tensor lse_forward(torch::Tensor za, torch::Tensor zc, int64_t self_offset, double scale,
                          const std::string& dot_dtype);

std::tuple<torch::Tensor, torch::Tensor> lse_backward(torch::Tensor za, torch::Tensor zc,
                                                      torch::Tensor lse, torch::Tensor w,
                                                      int64_t self_offset, double scale,
                                                      int64_t n_grad_cols,
                                                      const std::string& dot_dtype,
                                                      bool need_dza);

}  // namespace clreg

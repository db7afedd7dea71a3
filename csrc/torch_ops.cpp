// The CUDA kernels as PyTorch operators torch.ops.clreg_fast.cuda_lse_forward / cuda_lse_backward,
// so that torch.compile and torch.export can call them (their fake, shape-only implementations
// are registered from Python: clreg_fast/backends/cuda/__init__.py). Schemas hold tensors and
// scalars only. A FRAGMENT, because the Python side defines ops in the same namespace.
#include <torch/library.h>

#include "clreg_torch.h"

namespace {

std::tuple<at::Tensor, at::Tensor> lse_backward_op(at::Tensor za, at::Tensor zc, at::Tensor lse,
                                                   at::Tensor w, int64_t self_offset,
                                                   double scale, int64_t n_grad_cols,
                                                   std::string dot_dtype, bool need_dza) {
  // An operator has fixed outputs: without need_dza, dza is an empty (0, P) tensor.
  auto result = clreg::lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype,
                                    need_dza);
  if (!need_dza) {
    std::get<0>(result) = at::empty({0, za.size(1)}, za.options().dtype(at::kFloat));
  }
  return result;
}

at::Tensor lse_forward_op(at::Tensor za, at::Tensor zc, int64_t self_offset, double scale,
                          std::string dot_dtype) {
  return clreg::lse_forward(za, zc, self_offset, scale, dot_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clreg_fast, m) {
  m.def("cuda_lse_forward(Tensor za, Tensor zc, SymInt self_offset, float scale, str dot_dtype)"
        " -> Tensor");
  m.def("cuda_lse_backward(Tensor za, Tensor zc, Tensor lse, Tensor w, SymInt self_offset, "
        "float scale, SymInt n_grad_cols, str dot_dtype, bool need_dza) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clreg_fast, CUDA, m) {
  m.impl("cuda_lse_forward", &lse_forward_op);
  m.impl("cuda_lse_backward", &lse_backward_op);
}

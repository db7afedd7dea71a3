// Prints the wgmma shared-memory descriptors CuTe builds for the Hopper sweep (host code only,
// no GPU), one line per operand, D, stage and k block:
//   desc OPERAND D stage kb start lbo sbo base_offset layout_type
// (start, lbo, sbo in bytes; the ring base is shared-memory address 0, 1024-byte aligned, the
// owned tile at 0 too). OPERAND: scores_a (owned tile, K-major), scores_b (ring, K-major),
// product_b (the MN-major RingT view of the ring). tests/test_cuda_emulation.py decodes each
// descriptor with the PTX ISA's canonical layouts and checks that the wgmma reads exactly the
// matrix the emulation multiplies: whether CuTe turned the transposed view into a canonical
// MN-major descriptor, not only whether it compiled. On the host CuTe reports shared-memory
// address 0 for every pointer (and prints an ERROR line each time: the test skips those).
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#define CLREG_WGMMA_LAYOUTS 1
#include "wgmma_layouts.cuh"

using namespace cute;
using Elem = cutlass::bfloat16_t;  // the descriptors are the same for half_t

void print_desc(const char* operand, int d, int stage, int kb, GmmaDescriptor desc) {
  std::printf("desc %s %d %d %d %d %d %d %d %d\n", operand, d, stage, kb,
              int(desc.bitfield.start_address_) << 4, int(desc.bitfield.leading_byte_offset_) << 4,
              int(desc.bitfield.stride_byte_offset_) << 4, int(desc.bitfield.base_offset_),
              int(desc.bitfield.layout_type_));
}

template <int D>
void print_all(int thread) {
  using C = clreg::WgmmaConfig<D>;
  using L = clreg::wg::Layouts<Elem, D, C::kStages>;
  Elem* base = nullptr;  // smem address 0 on the host, see above
  Tensor s_own = make_tensor(make_smem_ptr(base), typename L::Tile{});
  Tensor s_ring = make_tensor(make_smem_ptr(base), typename L::Ring{});
  Tensor s_ring_t = make_tensor(make_smem_ptr(base), typename L::RingT{});
  clreg::wg::MmaScores<Elem, D> mma_s;
  clreg::wg::MmaProduct<Elem, D> mma_o;
  auto thr_s = mma_s.get_thread_slice(thread);
  auto thr_o = mma_o.get_thread_slice(thread);
  Tensor t_own = thr_s.partition_fragment_A(s_own);
  Tensor t_swept = thr_s.partition_fragment_B(s_ring);
  Tensor t_swept_t = thr_o.partition_fragment_B(s_ring_t);
  static_assert(size<1>(decltype(t_own.layout()){}) == 1 && size<1>(decltype(t_swept_t.layout()){}) == 1,
                "one wgmma per k block");
  for (int kb = 0; kb < size<2>(t_own); ++kb) print_desc("scores_a", D, 0, kb, t_own(0, 0, kb));
  for (int s = 0; s < C::kStages; ++s) {
    for (int kb = 0; kb < size<2>(t_swept); ++kb)
      print_desc("scores_b", D, s, kb, t_swept(0, 0, kb, s));
    for (int kb = 0; kb < size<2>(t_swept_t); ++kb)
      print_desc("product_b", D, s, kb, t_swept_t(0, 0, kb, s));
  }
}

int main(int argc, char** argv) {
  // Every thread of the warpgroup gets the same descriptors; argv[1] picks the thread.
  const int thread = argc > 1 ? std::atoi(argv[1]) : 0;
  print_all<64>(thread);
  print_all<128>(thread);
  print_all<256>(thread);
  return 0;
}

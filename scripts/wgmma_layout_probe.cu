// Prints what CuTe makes of the Hopper sweep's layouts and fragment views (host code only, no
// GPU): tests/test_cuda_emulation.py compiles it with nvcc when the CUTLASS headers are found
// and compares every line with its float64 emulation (tests/_cuda_emulation.py).
//   tile D r k off          element offset of (row r, feature k) in the swizzled 64 x D tile
//   ringt_mismatches D n    elements of the transposed ring view that are not Ring(n, d, s)
//   acc N t v row col       (row, column) of accumulator value v of thread t, 64 x N wgmma
//   view N t m n v          value index of (m, n) in rows_cols() of that accumulator
//   a kb i v                value index of element i, k block kb, of scores_as_a()
//   acoord t kb i row k     (row, k) of element i of k block kb of thread t's register A
//                           operand of the RS product (CuTe's wgmma A layout)
//   smem D bytes            WgmmaConfig<D>::kSmemBytes
#include <cstdint>
#include <cstdio>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#define CLREG_WGMMA_LAYOUTS 1
#include "wgmma_layouts.cuh"

using namespace cute;
using Elem = cutlass::bfloat16_t;  // the layouts are the same for half_t

template <int N, class Mma>
void print_acc(const char* tag) {
  Mma mma;
  for (int t = 0; t < 128; ++t) {
    auto thr = mma.get_thread_slice(t);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<Int<64>, Int<N>>{}));
    for (int v = 0; v < size(c); ++v)
      std::printf("acc %d %d %d %d %d\n", N, t, v, int(get<0>(c(v))), int(get<1>(c(v))));
    if (t == 0) {
      auto frag = partition_fragment_C(mma, Shape<Int<64>, Int<N>>{});
      auto view = clreg::wg::rows_cols(frag.layout());
      for (int m = 0; m < size<0>(view); ++m)
        for (int n = 0; n < size<1>(view); ++n) std::printf("view %d %d %d %d\n", N, m, n, int(view(m, n)));
      if constexpr (N == 64) {
        auto a = clreg::wg::scores_as_a(frag.layout());
        for (int kb = 0; kb < size<2>(a); ++kb)
          for (int i = 0; i < size<0>(a); ++i) std::printf("a %d %d %d\n", kb, i, int(a(i, 0, kb)));
      }
    }
  }
  (void)tag;
}

template <int D>
void print_all() {
  using C = clreg::WgmmaConfig<D>;
  using L = clreg::wg::Layouts<Elem, D, C::kStages>;
  // The 128-byte swizzle of these layouts acts on shared-memory addresses (smem_ptr_flag): the
  // offsets come from a tensor on a 1024-byte aligned (fake) shared-memory base.
  Elem* base = reinterpret_cast<Elem*>(uintptr_t(1) << 20);
  Tensor tile = make_tensor(make_smem_ptr(base), typename L::Tile{});
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < D; ++k)
      std::printf("tile %d %d %d %d\n", D, r, k, int(raw_pointer_cast(&tile(r, k)) - base));
  typename L::RingT ring_t;
  typename L::Ring ring;
  int bad = 0;
  for (int s = 0; s < C::kStages; ++s)
    for (int d = 0; d < D; ++d)
      for (int n = 0; n < 64; ++n) bad += int(ring_t(d, n, s)) != int(ring(n, d, s));
  std::printf("ringt_mismatches %d %d\n", D, bad);
  std::printf("smem %d %d\n", D, C::kSmemBytes);
  print_acc<D, clreg::wg::MmaProduct<Elem, D>>("product");
  if constexpr (D == 64) {  // the A layout of the RS product does not depend on D
    clreg::wg::MmaProduct<Elem, D> mma;
    for (int t = 0; t < 128; ++t) {
      Tensor a = mma.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, _64>{}));
      for (int kb = 0; kb < size<2>(a); ++kb)
        for (int i = 0; i < size<0>(a); ++i)
          std::printf("acoord %d %d %d %d %d\n", t, kb, i, int(get<0>(a(i, 0, kb))),
                      int(get<1>(a(i, 0, kb))));
    }
  }
  if constexpr (D == 64) print_acc<64, clreg::wg::MmaScores<Elem, D>>("scores");
}

int main() {
  print_all<64>();
  print_all<128>();
  print_all<256>();
  return 0;
}

// The CuTe pieces of the Hopper sweep (sweep_wgmma.cu): block configuration, shared-memory
// layouts, the two tiled MMAs and the two views of accumulator fragments that the kernel builds
// by hand. Host code can use them too: scripts/wgmma_layout_probe.cu prints them for
// tests/test_cuda_emulation.py, which checks its float64 emulation against CuTe's own answer.
#pragma once

#include "clreg.h"

namespace clreg {

template <int D>
struct WgmmaConfig {
  static_assert(D % 64 == 0 && D <= kSweepMaxDim, "D: multiple of 64, at most 256");
  // Ring depth: 2 at D = 256 keeps a block under half of the SM's shared memory (two resident
  // blocks); 3 otherwise.
  static constexpr int kStages = D == 256 ? 2 : 3;
  static constexpr int kTileBytes = kTile * D * 2;
  static constexpr int kVecBytes = 2 * kTile * 4;  // lse and w_rel of a swept tile (kCols)
  // 128-byte swizzled tiles must start on 1024-byte boundaries; the dynamic shared memory base
  // is aligned by hand, hence the slack.
  static constexpr int kAlignSlack = 1024;
  static constexpr int kSmemBytes =
      kAlignSlack + kTileBytes * (1 + kStages) + kVecBytes * kStages;
  // H100 / H200: at most 227 KB of shared memory per block.
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one block");
};

#if defined(CLREG_WITH_WGMMA) || defined(CLREG_WGMMA_LAYOUTS)
namespace wg {
using namespace cute;

template <typename E, int D, int kStages>
struct Layouts {
  using Atom = GMMA::Layout_K_SW128_Atom<E>;  // 8 rows x 64 features, 128-byte swizzle
  using Tile = decltype(tile_to_shape(Atom{}, Shape<Int<kTile>, Int<D>>{}));
  using Ring = decltype(tile_to_shape(Atom{}, Shape<Int<kTile>, Int<D>, Int<kStages>>{}));
  // The ring as (feature, swept row, stage): element (d, n, s) is Ring(n, d, s). The B operand
  // of P . swept_tile, MN-major (features contiguous).
  using RingT = decltype(composition(
      Ring{}, make_layout(Shape<Int<D>, Int<kTile>, Int<kStages>>{},
                          Stride<Int<kTile>, _1, Int<kTile * D>>{})));
  static_assert(cosize(Tile{}) * int(sizeof(E)) == WgmmaConfig<D>::kTileBytes, "tile bytes");
  static_assert(cosize(Ring{}) * int(sizeof(E)) == kStages * WgmmaConfig<D>::kTileBytes,
                "ring bytes");
};

// S (64 x 64) = own (64 x D) . swept^T: SS, both K-major.
template <typename E, int D>
using MmaScores = decltype(make_tiled_mma(
    GMMA::ss_op_selector<E, E, float, Shape<Int<kTile>, Int<kTile>, Int<D>>>()));
// acc (64 x D) += P (64 x 64, registers) . swept_tile (64 x D, MN-major in shared memory).
template <typename E, int D>
using MmaProduct = decltype(make_tiled_mma(
    GMMA::rs_op_selector<E, E, float, Shape<Int<kTile>, Int<D>, Int<kTile>>, GMMA::Major::K,
                         GMMA::Major::MN>()));

// A wgmma accumulator layout ((2 columns, 2 rows, N / 8 column blocks), 1, 1) viewed as
// (rows, columns) = ((2), (2, N / 8)): row m, column n of this thread's elements.
template <class L>
CUTE_HOST_DEVICE constexpr auto rows_cols(L acc) {
  static_assert(rank(L{}) == 3 && rank(get<0>(L{})) == 3, "wgmma accumulator layout");
  static_assert(size<0, 0>(L{}) == 2 && size<0, 1>(L{}) == 2, "wgmma accumulator layout");
  static_assert(size<1>(L{}) == 1 && size<2>(L{}) == 1, "one wgmma atom per tile");
  return make_layout(layout<0, 1>(acc), make_layout(layout<0, 0>(acc), layout<0, 2>(acc)));
}

// The S accumulator layout ((2, 2, 8), 1, 1) as the A operand of a K = 64 RS product:
// ((2 k, 2 rows, 2 k halves), 1, 4 k blocks). Value for value the same registers: column block
// j of S is k half j % 2 of k block j / 2 (the wgmma A and accumulator fragments share the
// (row g / g + 8, column pair 2q) pattern).
template <class L>
CUTE_HOST_DEVICE constexpr auto scores_as_a(L acc) {
  static_assert(size<0, 2>(L{}) == kTile / 8, "64 score columns");
  auto blocks = flatten(logical_divide(layout<0, 2>(acc), Tile<_2>{}));  // (2, 4)
  return make_layout(make_layout(layout<0, 0>(acc), layout<0, 1>(acc), layout<0>(blocks)),
                     layout<1>(acc), layout<1>(blocks));
}

}  // namespace wg
#endif

}  // namespace clreg

// How a sweep is cut into splits (host code only; no CUDA or PyTorch types).
//
// A kernel launches one block per output tile (anchor tiles for the forward and the row pass,
// gradient-column tiles for the column pass) times `count` splits of the swept tiles. Few output
// tiles against many swept tiles (token-level anchors against a 64K-row retain queue) leave most
// SMs idle unless the sweep is split. Each split costs one workspace slice: `slice_elements`
// floats (the forward: n_anchor floats of partial log-sum-exp; the backward: one padded
// round_up(n, 64) x round_up(P, 64) float32 block). The first slice is always needed; only the
// EXTRA slices are capped, by kMaxExtraWorkspaceElements.
//
// clreg_fast/backends/cuda/splits.py mirrors this function line by line (the float64 emulation
// tests use it) and scripts/check_cuda_build.sh compares the two through clreg_fast._C.
#pragma once

#include <algorithm>
#include <cstdint>

namespace clreg {

// 64 MiB of float32 for the splits beyond the first.
constexpr int64_t kMaxExtraWorkspaceElements = int64_t(1) << 24;
// gridDim.y limit of a CUDA launch.
constexpr int64_t kMaxSplitsGrid = 65535;

struct Splits {
  int count;            // slices of the sweep, each non-empty
  int tiles_per_split;  // swept tiles per slice (the last one may have fewer)
};

// `n_blocks` output tiles, `n_swept_tiles` tiles to sweep, `slice_elements` floats of workspace
// per split, a GPU with `multiprocessors` SMs running `blocks_per_sm` blocks of this kernel each.
inline Splits choose_splits(int64_t n_blocks, int64_t n_swept_tiles, int64_t slice_elements,
                            int64_t multiprocessors, int64_t blocks_per_sm) {
  const int64_t swept = std::max<int64_t>(n_swept_tiles, 1);
  const int64_t target_blocks =
      std::max<int64_t>(blocks_per_sm, 1) * std::max<int64_t>(multiprocessors, 1);
  const int64_t wanted = (target_blocks + std::max<int64_t>(n_blocks, 1) - 1) /
                         std::max<int64_t>(n_blocks, 1);
  int64_t cap = std::min(swept, kMaxSplitsGrid);
  if (slice_elements > 0) cap = std::min(cap, 1 + kMaxExtraWorkspaceElements / slice_elements);
  const int64_t aim = std::max<int64_t>(1, std::min(wanted, cap));
  // Whole tiles per split: rounding down gives at least `aim` splits; when that passes the cap,
  // round up (at most `aim` splits, at least half of them).
  int64_t per_split = std::max<int64_t>(1, swept / aim);
  if ((swept + per_split - 1) / per_split > cap) per_split = (swept + aim - 1) / aim;
  // Recount so that no split is empty.
  return {static_cast<int>((swept + per_split - 1) / per_split), static_cast<int>(per_split)};
}

}  // namespace clreg

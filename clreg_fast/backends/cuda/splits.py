"""The CUDA kernels' split policy (csrc/splits.h), mirrored in Python.

Used by the float64 emulation of the kernels (tests/test_cuda_emulation.py) and checked against
the compiled ``clreg_fast._C.choose_splits`` by scripts/check_cuda_build.sh. Pure Python: no
torch, no GPU.
"""
from __future__ import annotations

from typing import Tuple

MAX_EXTRA_WORKSPACE_ELEMENTS = 1 << 24  # kMaxExtraWorkspaceElements: 64 MiB of float32
MAX_SPLITS_GRID = 65535                 # kMaxSplitsGrid: gridDim.y limit
TILE = 64                               # kTile


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def choose_splits(n_blocks: int, n_swept_tiles: int, slice_elements: int, multiprocessors: int,
                  blocks_per_sm: int) -> Tuple[int, int]:
    """``(count, tiles_per_split)`` for a sweep of ``n_swept_tiles`` tiles by ``n_blocks``
    output tiles, each split costing ``slice_elements`` workspace floats (the first split is
    always there; only the extra ones are capped)."""
    swept = max(n_swept_tiles, 1)
    target_blocks = max(blocks_per_sm, 1) * max(multiprocessors, 1)
    wanted = _ceil_div(target_blocks, max(n_blocks, 1))
    cap = min(swept, MAX_SPLITS_GRID)
    if slice_elements > 0:
        cap = min(cap, 1 + MAX_EXTRA_WORKSPACE_ELEMENTS // slice_elements)
    aim = max(1, min(wanted, cap))
    # Whole tiles per split: rounding down gives at least `aim` splits; when that passes the
    # cap, round up (at most `aim` splits, at least half of them).
    per_split = max(1, swept // aim)
    if _ceil_div(swept, per_split) > cap:
        per_split = _ceil_div(swept, aim)
    return _ceil_div(swept, per_split), per_split  # recounted: no split is empty


def forward_splits(n_anchor: int, n_col: int, multiprocessors: int, blocks_per_sm: int):
    """The forward's splits: one slice is ``n_anchor`` floats of partial log-sum-exp."""
    return choose_splits(_ceil_div(n_anchor, TILE), _ceil_div(n_col, TILE), n_anchor,
                         multiprocessors, blocks_per_sm)


def backward_splits(n_owned: int, n_swept: int, dim: int, multiprocessors: int,
                    blocks_per_sm: int):
    """A backward pass's splits: one slice is round_up(n_owned, 64) x round_up(dim, 64) floats."""
    owned_tiles = _ceil_div(n_owned, TILE)
    slice_elements = owned_tiles * TILE * _ceil_div(dim, TILE) * TILE
    return choose_splits(owned_tiles, _ceil_div(n_swept, TILE), slice_elements, multiprocessors,
                         blocks_per_sm)


__all__ = ["choose_splits", "forward_splits", "backward_splits", "MAX_EXTRA_WORKSPACE_ELEMENTS",
           "MAX_SPLITS_GRID", "TILE"]

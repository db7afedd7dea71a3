"""FLOP model of the fused CLReg algorithm, the yardstick of the roofline columns.

Only matrix-product FLOPs are counted (a multiply-add is 2 FLOPs); the exponentials, the
normalization and the reductions are O(Nf (Nf + Nr)) or O((Nf + Nr) K) elementwise work and are
left out, so the floor below is a lower bound. With N = Nf + Nr rows and K the width of the
normalized features (K = P with a projection, K = D without):

forward
    projection          2 N D P              (y = x W^T, only with a projection)
    similarity          2 Nf N K             (one pass of the log-sum-exp over all columns)
backward
    recompute           2 Nf N K             (probability tiles are recomputed, never stored)
    anchor gradient     2 Nf N K             (dZ_anchor = G Z)
    column gradient     2 Nf C K             (dZ_cols = G^T Z_anchor, C columns need it)
    projection weight   2 R D P              (dW = dY^T X over the R rows that carry dY)
    projection input    2 I D P              (dX = dY W over the I rows whose input wants grad)

C = R = N when the retain rows need a feature gradient (retain requires grad, or the projection
is trained: its weight gradient sums over retain rows too), else C = R = Nf; I = Nf, plus Nr when
retain requires grad. The projection weight always requires grad in these benchmarks.

The same count is used for every provider (useful work of the fused algorithm, recompute
included), so effective TFLOP/s compare providers on equal work, and ``floor = FLOPs / measured
matmul rate`` is the time no implementation of this algorithm can beat on that device. The
eager reference does 2 Nf N K fewer backward FLOPs (it stores the matrix instead of recomputing).
"""
from __future__ import annotations

from typing import Dict

from clreg_fast.bench.config import BenchConfig


def flop_model(config: BenchConfig) -> Dict[str, int]:
    """Matmul FLOPs of the fused algorithm: ``{"fwd": ..., "bwd": ..., "fwd_bwd": ...}``."""
    nf, nr, d = config.nf, config.nr, config.d
    n = nf + nr
    projected = config.p is not None
    k = config.p if projected else d
    retain_grad = not config.retain_detached
    retain_rows_need_dz = nr > 0 and (retain_grad or projected)
    grad_cols = n if retain_rows_need_dz else nf

    similarity = 2 * nf * n * k
    fwd = similarity + (2 * n * d * k if projected else 0)
    bwd = 2 * similarity + 2 * nf * grad_cols * k
    if projected:
        rows_dy = n if retain_rows_need_dz else nf
        rows_dx = nf + (nr if retain_grad else 0)
        bwd += 2 * rows_dy * d * k + 2 * rows_dx * d * k
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def matrix_bytes(config: BenchConfig, element_bytes: int = 4) -> int:
    """Bytes of one (Nf, Nf + Nr) similarity matrix: what a materializing loss holds at least once."""
    return config.nf * config.n * element_bytes


def roofline(flops: float, seconds: float, matmul_flops_per_s: float) -> Dict[str, float]:
    """Effective rate, its fraction of the measured matmul rate, and time over the floor."""
    if not seconds or seconds <= 0 or not matmul_flops_per_s or matmul_flops_per_s <= 0:
        return {"tflops": float("nan"), "frac_of_matmul": float("nan"),
                "x_roofline_floor": float("nan")}
    rate = flops / seconds
    floor = flops / matmul_flops_per_s
    return {"tflops": rate / 1e12, "frac_of_matmul": rate / matmul_flops_per_s,
            "x_roofline_floor": seconds / floor}

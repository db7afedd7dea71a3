"""Launchers of the triton kernels and ``TritonKernels``, the backend the registry hands out.

Block sizes are fixed by a small table (no autotuning: the first call of a training step stays
cheap and the choice is reproducible). Under ``TRITON_INTERPRET=1`` small blocks keep
interpreter runs fast while still splitting test shapes into several partial tiles.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from clreg_fast.backends.base import NORM_EPS, SimilarityKernels
from clreg_fast.backends.triton import kernels as K

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old or very new triton layouts
    _InterpretedFunction = ()

# triton.jit reads TRITON_INTERPRET when kernels.py is imported; ask the kernels themselves.
INTERPRET = isinstance(K.lse_forward_kernel, _InterpretedFunction)

# Every launch goes through _launch(kernel)[grid](...): torch.library.wrap_triton (torch >= 2.6)
# lets torch.compile trace the launches inside the triton_op custom ops of library.py; outside
# a trace it launches as usual. Interpreted kernels cannot be wrapped: identity there.
if hasattr(torch.library, "wrap_triton") and not INTERPRET:
    _launch = torch.library.wrap_triton
else:
    def _launch(kernel):
        return kernel

# Widest feature tile a program keeps whole. Wider P is split into tiles of this width: the
# projection then writes y and normalizes in a second pass, the similarity kernels sum scores
# over the tiles and give each output tile its own program (scores are recomputed per tile).
MAX_BLOCK_P = 256

# exp(-2 * scale) must stay a normal float32 for the fixed-shift log-sum-exp: scale <= 43.6.
FIXED_SHIFT_MAX_SCALE = 40.0

_ROUND = {torch.float32: K.ROUND_FP32, torch.bfloat16: K.ROUND_BF16, torch.float16: K.ROUND_FP16}


def _round_kind(dtype: torch.dtype) -> int:
    if dtype not in _ROUND:
        raise TypeError(f"the triton backend takes fp16, bf16 or fp32 inputs, got {dtype}")
    return _ROUND[dtype]


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not INTERPRET:
            raise ValueError(
                "the triton kernels need CUDA tensors; to run them on CPU tensors set "
                "TRITON_INTERPRET=1 in the environment before importing clreg_fast (slow, "
                "meant for testing)"
            )


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _feature_block(p: int, max_block_p: int) -> Tuple[int, int]:
    """(BLOCK_P, number of tiles) for feature width p; tl.dot needs every dim >= 16."""
    block_p = min(max(16, triton.next_power_of_2(p)), max_block_p)
    return block_p, triton.cdiv(p, block_p)


def _similarity_config(block_p: int, k_tiles: int, round_kind: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the similarity kernels.

    Chosen by compiling the variants for sm_90 and sm_80 (``compile_check.py``, ptxas -v): at
    most a few hundred bytes of register spills, shared memory within an A100's 164 KiB. Not
    yet timed on a GPU. float32 products run on FMA
    units (no TF32), whose operands live in registers, hence smaller tiles than bf16/fp16.
    """
    if INTERPRET:
        return 16, 16, 4, 1
    if block_p <= 32:
        return 64, 64, 4, 3
    if round_kind == K.ROUND_FP32 or k_tiles > 1:
        return 32, 32, 4 if block_p <= 128 else 8, 2
    if block_p <= 64:
        return 64, 64, 4, 3
    return 64, 32, 8, 2


def _project_config(p: int, round_kind: int, max_block_p: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_P, P tiles, num_warps) of the projection kernel."""
    block_p, p_tiles = _feature_block(p, max_block_p)
    if INTERPRET:
        return 16, 32, block_p, p_tiles, 4
    # float32 FMA products keep operands in registers: a smaller tile at wide P
    block_m = 32 if round_kind == K.ROUND_FP32 and block_p >= 128 else 64
    return block_m, 32, block_p, p_tiles, 4 if block_p <= 64 else 8


def _rowwise_config(p: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_P, num_warps) of the memory-bound normalization kernels."""
    if INTERPRET:  # 64 < 100 lets tests cover the loop over column tiles
        return 16, min(max(16, triton.next_power_of_2(p)), 64), 4
    return 16, min(max(16, triton.next_power_of_2(p)), 256), 8


class TritonKernels(SimilarityKernels):
    """Fused triton kernels for the projection, normalization and similarity primitives.

    Args:
        max_block_p: widest feature tile (a power of two >= 16); wider P is tiled (see
            ``MAX_BLOCK_P``). Tests lower it to exercise the tiled paths on small shapes.
        running_max: force the running-max log-sum-exp (True) or the fixed shift (False);
            None picks the fixed shift whenever ``scale <= FIXED_SHIFT_MAX_SCALE``.
    """

    name = "triton"
    rounds_dot_operands = True

    def __init__(self, max_block_p: int = MAX_BLOCK_P, running_max: Optional[bool] = None):
        if max_block_p < 16 or max_block_p & (max_block_p - 1):
            raise ValueError(f"max_block_p must be a power of two >= 16, got {max_block_p}")
        self.max_block_p = max_block_p
        self.running_max = running_max

    # ------------------------------------------------------------------ projection

    def project_normalize(self, x, weight, bias):
        """``(z, ||y||)`` in float32 with ``y = x W^T + b``, ``z = y / max(||y||, 1e-12)``."""
        if x.dtype == torch.float64:  # the registry never sends float64 here; keep the contract
            return super().project_normalize(x, weight, bias)
        _check_device(x)
        round_kind = _round_kind(x.dtype)
        x = x.contiguous()
        n, d = x.shape
        p = weight.shape[0] if weight is not None else d
        z = torch.empty((n, p), dtype=torch.float32, device=x.device)
        norm = torch.empty((n,), dtype=torch.float32, device=x.device)
        if n == 0:
            return z, norm
        if weight is None:
            self._normalize_into(x, z, norm)
            return z, norm

        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        block_m, block_k, block_p, p_tiles, warps = _project_config(p, round_kind, self.max_block_p)
        grid = (triton.cdiv(n, block_m), p_tiles)
        _launch(K.project_kernel)[grid](
            x, weight, bias if bias is not None else x, z, norm, n, d, p,
            x.stride(0), weight.stride(0), z.stride(0), NORM_EPS,
            HAS_BIAS=bias is not None, NORMALIZE=p_tiles == 1, BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_P=block_p, ROUND=round_kind, INTERPRET=INTERPRET, num_warps=warps,
        )
        if p_tiles > 1:  # z holds y: normalize it in place
            self._normalize_into(z, z, norm)
        return z, norm

    def _normalize_into(self, y: torch.Tensor, z: torch.Tensor, norm: torch.Tensor) -> None:
        n, p = y.shape
        block_m, block_p, warps = _rowwise_config(p)
        _launch(K.normalize_kernel)[(triton.cdiv(n, block_m),)](
            y, z, norm, n, p, y.stride(0), z.stride(0), NORM_EPS,
            BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps,
        )

    def normalize_backward(self, dz, z, norm):
        """Gradient through the normalization, fused (same math as the base class)."""
        if z.dtype == torch.float64:
            return super().normalize_backward(dz, z, norm)
        _check_device(dz, z, norm)
        dz, z, norm = _f32(dz), _f32(z), _f32(norm)
        n, p = z.shape
        dy = torch.empty((n, p), dtype=torch.float32, device=z.device)
        if n == 0:
            return dy
        block_m, block_p, warps = _rowwise_config(p)
        _launch(K.normalize_backward_kernel)[(triton.cdiv(n, block_m),)](
            dz, z, norm, dy, n, p, dz.stride(0), z.stride(0), dy.stride(0), NORM_EPS,
            BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps,
        )
        return dy

    # ------------------------------------------------------------------ similarity

    def _fixed_shift(self, scale: float) -> bool:
        if self.running_max is not None:
            return not self.running_max
        return scale <= FIXED_SHIFT_MAX_SCALE

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        _check_device(za, zc)
        round_kind = _round_kind(dot_dtype)
        za, zc = _f32(za), _f32(zc)
        n_rows, p = za.shape
        n_cols = zc.shape[0]
        lse = torch.empty((n_rows,), dtype=torch.float32, device=za.device)
        if n_rows == 0:
            return lse
        block_p, k_tiles = _feature_block(p, self.max_block_p)
        block_m, block_n, warps, stages = _similarity_config(block_p, k_tiles, round_kind)
        _launch(K.lse_forward_kernel)[(triton.cdiv(n_rows, block_m),)](
            za, zc, lse, n_rows, n_cols, p, za.stride(0), zc.stride(0), int(self_offset),
            float(scale),
            FIXED_SHIFT=self._fixed_shift(float(scale)), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_P=block_p, K_TILES=k_tiles, ROUND=round_kind, INTERPRET=INTERPRET,
            num_warps=warps, num_stages=stages,
        )
        return lse

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols,
                     dot_dtype=torch.float32, need_dza=True):
        _check_device(za, zc, lse, w)
        round_kind = _round_kind(dot_dtype)
        za, zc, lse, w = _f32(za), _f32(zc), _f32(lse), _f32(w)
        n_rows, p = za.shape
        n_cols = zc.shape[0]
        n_grad_cols = int(n_grad_cols)
        if not 0 <= n_grad_cols <= n_cols:
            raise ValueError(f"n_grad_cols must be in [0, {n_cols}], got {n_grad_cols}")
        dza = torch.empty_like(za) if need_dza else None
        dzc = torch.empty((n_grad_cols, p), dtype=torch.float32, device=za.device)
        block_p, k_tiles = _feature_block(p, self.max_block_p)
        block_m, block_n, warps, stages = _similarity_config(block_p, k_tiles, round_kind)
        common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=block_p, K_TILES=k_tiles,
                      ROUND=round_kind, INTERPRET=INTERPRET, num_warps=warps, num_stages=stages)
        if n_rows and need_dza:
            _launch(K.lse_backward_rows_kernel)[(triton.cdiv(n_rows, block_m), k_tiles)](
                za, zc, lse, w, dza, n_rows, n_cols, p, za.stride(0), zc.stride(0),
                dza.stride(0), int(self_offset), float(scale), **common,
            )
        # Retain columns that need no gradient are not visited at all.
        if n_grad_cols and n_rows:
            # max|w| stays on the device (no host sync); the kernel divides the weights by it.
            w_max = w.abs().amax().clamp_min(1e-30).reshape(1)
            _launch(K.lse_backward_cols_kernel)[(triton.cdiv(n_grad_cols, block_n), k_tiles)](
                za, zc, lse, w, w_max, dzc, n_rows, n_grad_cols, p, za.stride(0), zc.stride(0),
                dzc.stride(0), int(self_offset), float(scale), **common,
            )
        elif n_grad_cols:
            dzc.zero_()
        return dza, dzc


__all__ = ["TritonKernels", "INTERPRET", "MAX_BLOCK_P"]

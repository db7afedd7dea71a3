"""Launchers of the triton kernels and ``TritonKernels``, the backend the registry hands out.

Block sizes of the similarity kernels come from ``tuning.py``: a tuned table when one matches
the device (written by ``python -m clreg_fast.backends.triton.autotune`` on a GPU, read once),
else fixed defaults. Nothing is tuned at launch, so the first call of a training step stays
cheap and the choice is reproducible. Under ``TRITON_INTERPRET=1`` small blocks keep
interpreter runs fast while still splitting test shapes into several partial tiles.

Every launch is written ``_launch(K.<name>_kernel)[grid](...)`` inside ``_on_device(tensor)``:
triton launches on the current CUDA device, which need not be the tensors' one
(``device_map="auto"``, ``cuda:k`` without ``torch.cuda.set_device``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton

from clreg_fast.backends.base import NORM_EPS, SimilarityKernels
from clreg_fast.backends.triton import kernels as K
from clreg_fast.backends.triton import tuning
from clreg_fast.backends.triton.tuning import KernelConfig

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old or very new triton layouts
    _InterpretedFunction = ()

# triton.jit reads TRITON_INTERPRET when kernels.py is imported; ask the kernels themselves.
INTERPRET = isinstance(K.lse_forward_kernel, _InterpretedFunction)

# torch.library.wrap_triton (torch >= 2.6) lets torch.compile and torch.library.triton_op trace
# the launches; a plain launch where it is missing, and in the interpreter (torch 2.6's
# wrap_triton refuses interpreted kernels).
_wrap_triton = getattr(torch.library, "wrap_triton", None)
_launch = _wrap_triton if _wrap_triton is not None and not INTERPRET else (lambda kernel: kernel)

# Widest feature tile a program keeps whole. Wider P is split into tiles of this width: the
# projection then writes y and normalizes in a second pass, the similarity kernels sum scores
# over all of P (in chunks of ``kernels.SCORE_CHUNK`` features) and give each output tile its
# own program (scores are recomputed per tile).
MAX_BLOCK_P = 256

# exp(-2 * scale) must stay a normal float32 for the fixed-shift log-sum-exp: scale <= 43.6.
FIXED_SHIFT_MAX_SCALE = 40.0

# Column splits: used when the anchor blocks alone leave at least half of the SMs idle (few
# anchors against many columns). Each split sweeps at least MIN_TILES_PER_SPLIT column tiles;
# the splits aim at SPLIT_WAVES programs per SM. A rule, not yet timed on a GPU.
MIN_TILES_PER_SPLIT = 8
SPLIT_WAVES = 2
MAX_COL_SPLITS = 128

_ROUND = {torch.float32: K.ROUND_FP32, torch.bfloat16: K.ROUND_BF16, torch.float16: K.ROUND_FP16}
_KIND = {K.ROUND_FP32: "fp32", K.ROUND_TF32: "tf32", K.ROUND_BF16: "bf16", K.ROUND_FP16: "fp16"}


def _round_kind(dtype: torch.dtype, allow_tf32: bool = False) -> int:
    if dtype not in _ROUND:
        raise TypeError(f"the triton backend takes fp16, bf16 or fp32 inputs, got {dtype}")
    if dtype == torch.float32 and allow_tf32:
        return K.ROUND_TF32
    return _ROUND[dtype]


def _on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (cheap when it already is)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _auto_column_splits(programs: int, col_tiles: int, device: torch.device) -> int:
    """Splits of the column range so that ``programs`` blocks of anchors fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if 2 * programs > sms:
        return 1
    wanted = triton.cdiv(SPLIT_WAVES * sms, programs)
    return max(1, min(wanted, col_tiles // MIN_TILES_PER_SPLIT, MAX_COL_SPLITS))


def _column_splits(col_splits: Optional[int], programs: int, n_cols: int, block_n: int,
                   device: torch.device) -> Tuple[int, int]:
    """(number of splits, columns per split: a multiple of block_n); every split is non-empty."""
    col_tiles = max(1, triton.cdiv(n_cols, block_n))
    if col_splits is None:
        splits = _auto_column_splits(programs, col_tiles, device)
    else:
        if isinstance(col_splits, bool) or not isinstance(col_splits, int) or col_splits < 1:
            raise ValueError(f"col_splits must be a positive int or None, got {col_splits!r}")
        splits = min(col_splits, col_tiles)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)  # drop splits left without a tile
    return splits, tiles_per_split * block_n


def _check_config(config, name: str) -> Optional[KernelConfig]:
    if config is None:
        return None
    if isinstance(config, dict):
        config = KernelConfig.from_dict(config)
    if not isinstance(config, KernelConfig):
        raise TypeError(f"{name} must be a tuning.KernelConfig, a dict or None, "
                        f"got {type(config).__name__}")
    for field in ("block_m", "block_n"):
        value = getattr(config, field)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}.{field} must be a power of two >= 16, got {value}")
    return config


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


def _similarity_config(kernel: str, block_p: int, k_tiles: int, round_kind: int,
                       device: Optional[torch.device] = None,
                       override: Optional[KernelConfig] = None) -> KernelConfig:
    """The launch configuration of a similarity kernel (see ``tuning.py``).

    ``override`` (the launchers' ``config`` arguments, used by the autotuner and tests) wins;
    then a tuned table matching ``device``; then the defaults. The interpreter uses small
    blocks unless overridden.
    """
    if override is not None:
        return override
    if INTERPRET:
        return tuning.INTERPRET_CONFIG
    return tuning.lookup(kernel, _KIND[round_kind], block_p, k_tiles, device)


def _project_config(p: int, round_kind: int, max_block_p: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_P, P tiles, num_warps) of the projection kernel."""
    block_p, p_tiles = _feature_block(p, max_block_p)
    if INTERPRET:
        return 16, 32, block_p, p_tiles, 4
    # float32 FMA products keep operands in registers: a smaller tile at wide P (BLOCK_K = 32
    # spills 8-40 bytes at BLOCK_P = 256 on sm_80/sm_90, BLOCK_K = 16 none)
    if round_kind in (K.ROUND_FP32, K.ROUND_TF32) and block_p >= 128:
        return 32, 16, block_p, p_tiles, 8
    return 64, 32, block_p, p_tiles, 4 if block_p <= 64 else 8


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
        allow_tf32: TF32 tensor-core products for float32 inputs (errors of TF32's 10-bit
            mantissa, ~1e-3 relative, instead of float32's). None (the default) follows PyTorch's
            switch for float32 matmuls, ``torch.get_float32_matmul_precision() != "highest"``,
            which is off unless the user turns it on; False or True decide here.
    """

    name = "triton"
    rounds_dot_operands = True

    def __init__(self, max_block_p: int = MAX_BLOCK_P, running_max: Optional[bool] = None,
                 allow_tf32: Optional[bool] = None):
        if max_block_p < 16 or max_block_p & (max_block_p - 1):
            raise ValueError(f"max_block_p must be a power of two >= 16, got {max_block_p}")
        if allow_tf32 is not None and not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be None, True or False, got {allow_tf32!r}")
        self.max_block_p = max_block_p
        self.running_max = running_max
        self.allow_tf32 = allow_tf32

    def _tf32(self) -> bool:
        if self.allow_tf32 is not None:
            return self.allow_tf32
        return torch.get_float32_matmul_precision() != "highest"

    def _round(self, dtype: torch.dtype) -> int:
        return _round_kind(dtype, self._tf32())

    # ------------------------------------------------------------------ projection

    def project_normalize(self, x, weight, bias):
        """``(z, ||y||)`` in float32 with ``y = x W^T + b``, ``z = y / max(||y||, 1e-12)``."""
        if x.dtype == torch.float64:  # the registry never sends float64 here; keep the contract
            return super().project_normalize(x, weight, bias)
        _check_device(x)
        round_kind = self._round(x.dtype)
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
        with _on_device(x):
            _launch(K.project_kernel)[grid](
                x, weight, bias if bias is not None else x, z, norm, n, d, p,
                x.stride(0), weight.stride(0), z.stride(0), NORM_EPS,
                HAS_BIAS=bias is not None, NORMALIZE=p_tiles == 1, BLOCK_M=block_m,
                BLOCK_K=block_k, BLOCK_P=block_p, ROUND=round_kind, INTERPRET=INTERPRET,
                num_warps=warps,
            )
        if p_tiles > 1:  # z holds y: normalize it in place
            self._normalize_into(z, z, norm)
        return z, norm

    def _normalize_into(self, y: torch.Tensor, z: torch.Tensor, norm: torch.Tensor) -> None:
        n, p = y.shape
        block_m, block_p, warps = _rowwise_config(p)
        with _on_device(y):
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
        with _on_device(z):
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

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32, *,
                    config=None, col_splits=None):
        """``lse_i = logsumexp_c scale * za_i . zc_c`` over ``c != i + self_offset``.

        ``config`` (a ``tuning.KernelConfig``) overrides the launch configuration;
        ``col_splits`` forces the number of column splits (None: automatic, see
        ``_auto_column_splits``).
        """
        _check_device(za, zc)
        round_kind = self._round(dot_dtype)
        config = _check_config(config, "config")
        za, zc = _f32(za), _f32(zc)
        n_rows, p = za.shape
        n_cols = zc.shape[0]
        lse = torch.empty((n_rows,), dtype=torch.float32, device=za.device)
        if n_rows == 0:
            return lse
        block_p, k_tiles = _feature_block(p, self.max_block_p)
        cfg = _similarity_config("lse_forward", block_p, k_tiles, round_kind, za.device, config)
        row_blocks = triton.cdiv(n_rows, cfg.block_m)
        splits, cols_per_split = _column_splits(col_splits, row_blocks, n_cols, cfg.block_n,
                                                za.device)
        out = lse if splits == 1 else torch.empty((splits, n_rows), dtype=torch.float32,
                                                   device=za.device)
        with _on_device(za):
            _launch(K.lse_forward_kernel)[(row_blocks, splits)](
                za, zc, out, n_rows, n_cols, p, za.stride(0), zc.stride(0), int(self_offset),
                float(scale), cols_per_split, n_rows,
                FIXED_SHIFT=self._fixed_shift(float(scale)), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_P=block_p, K_TILES=k_tiles, ROUND=round_kind,
                INTERPRET=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if splits > 1:  # merge the partial log-sum-exps (all -inf stays -inf)
            torch.logsumexp(out, dim=0, out=lse)
        return lse

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols,
                     dot_dtype=torch.float32, need_dza=True, *, rows_config=None,
                     cols_config=None, col_splits=None):
        """Gradients of ``sum_i w_i lse_i`` (see ``SimilarityKernels.lse_backward``).

        ``rows_config`` / ``cols_config`` override the configurations of the row and column
        kernels; ``col_splits`` forces the column splits of the row kernel (None: automatic).
        """
        _check_device(za, zc, lse, w)
        round_kind = self._round(dot_dtype)
        rows_config = _check_config(rows_config, "rows_config")
        cols_config = _check_config(cols_config, "cols_config")
        za, zc, lse, w = _f32(za), _f32(zc), _f32(lse), _f32(w)
        n_rows, p = za.shape
        n_cols = zc.shape[0]
        n_grad_cols = int(n_grad_cols)
        if not 0 <= n_grad_cols <= n_cols:
            raise ValueError(f"n_grad_cols must be in [0, {n_cols}], got {n_grad_cols}")
        dza = torch.empty_like(za) if need_dza else None
        dzc = torch.empty((n_grad_cols, p), dtype=torch.float32, device=za.device)
        block_p, k_tiles = _feature_block(p, self.max_block_p)
        common = dict(BLOCK_P=block_p, K_TILES=k_tiles, ROUND=round_kind, INTERPRET=INTERPRET)
        if n_rows and need_dza:
            cfg = _similarity_config("lse_backward_rows", block_p, k_tiles, round_kind,
                                     za.device, rows_config)
            row_blocks = triton.cdiv(n_rows, cfg.block_m)
            splits, cols_per_split = _column_splits(col_splits, row_blocks * k_tiles, n_cols,
                                                    cfg.block_n, za.device)
            # One partial sum per split, added afterwards in a fixed order (deterministic).
            out = dza if splits == 1 else torch.empty((splits, n_rows, p), dtype=torch.float32,
                                                       device=za.device)
            with _on_device(za):
                _launch(K.lse_backward_rows_kernel)[(row_blocks, k_tiles, splits)](
                    za, zc, lse, w, out, n_rows, n_cols, p, za.stride(0), zc.stride(0),
                    dza.stride(0), int(self_offset), float(scale), cols_per_split, n_rows * p,
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, **common,
                )
            if splits > 1:
                torch.sum(out, dim=0, out=dza)
        # Retain columns that need no gradient are not visited at all.
        if n_grad_cols and n_rows:
            cfg = _similarity_config("lse_backward_cols", block_p, k_tiles, round_kind,
                                     za.device, cols_config)
            with _on_device(za):
                # max|w| stays on the device (no host sync); the kernel divides the weights by it.
                w_max = w.abs().amax().clamp_min(1e-30).reshape(1)
                _launch(K.lse_backward_cols_kernel)[(triton.cdiv(n_grad_cols, cfg.block_n),
                                                     k_tiles)](
                    za, zc, lse, w, w_max, dzc, n_rows, n_grad_cols, p, za.stride(0),
                    zc.stride(0), dzc.stride(0), int(self_offset), float(scale),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, **common,
                )
        elif n_grad_cols:
            dzc.zero_()
        return dza, dzc


__all__ = ["TritonKernels", "INTERPRET", "MAX_BLOCK_P"]

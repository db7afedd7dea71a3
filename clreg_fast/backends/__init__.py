"""Backend registry: which backends this process can use, and which one a call gets.

Nothing here imports triton or the compiled extension at import time of ``clreg_fast``; each
backend is probed the first time it is asked for.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import List, Optional

import torch

from clreg_fast.backends.base import SimilarityKernels

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _memo(probe):
    """Cache a probe's answer in a plain dict (torch.compile traces through it quietly, unlike
    functools.lru_cache)."""
    answers = {}

    @functools.wraps(probe)
    def cached():
        if "answer" not in answers:
            answers["answer"] = probe()
        return answers["answer"]
    return cached


@_memo
def _triton_kernels():
    """The triton backend, or the reason it cannot load (triton missing or too old)."""
    try:
        from clreg_fast.backends.triton.library import CompilableTritonKernels
    except ImportError as exc:
        return None, f"triton could not be imported ({exc}); install it with `pip install triton`"
    return CompilableTritonKernels(), None


@_memo
def _cuda_kernels():
    """The compiled CUDA backend, or the reason it is not available."""
    try:
        from clreg_fast.backends.cuda import CudaKernels, load_extension
    except ImportError as exc:
        return None, f"the cuda backend is not part of this install ({exc})"
    ext, reason = load_extension()
    if ext is None:
        return None, reason
    return CudaKernels(ext), None


# Backends already loaded, by name. resolve_backend reads this plain dict first: a traced call
# (torch.compile) then sees a constant object instead of tracing a loader and its imports.
_LOADED = {}


def _torch_kernels():
    if "torch" not in _LOADED:
        from clreg_fast.backends.torch_chunked import TorchChunkedKernels

        _LOADED["torch"] = TorchChunkedKernels()
    return _LOADED["torch"]


def available_backends() -> List[str]:
    """Backends usable in this process, e.g. ``["reference", "torch", "triton", "cuda"]``."""
    names = ["reference", "torch"]
    gpu = torch.cuda.is_available()
    if (gpu or triton_interpreting()) and _triton_kernels()[0] is not None:
        names.append("triton")
    if gpu and _cuda_kernels()[0] is not None:
        names.append("cuda")
    return names


def resolve_backend(name: str, x: torch.Tensor) -> Optional[SimilarityKernels]:
    """Kernels for ``backend=name`` on tensors like ``x``; None means the reference.

    ``auto`` takes, for CUDA tensors, the compiled extension, then triton, then the chunked
    PyTorch backend; CPU tensors get the chunked PyTorch backend.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return None
    on_gpu = x.is_cuda
    key = (name, on_gpu, x.dtype == torch.float64, triton_interpreting())
    loaded = _LOADED.get(key)
    if loaded is not None:
        return loaded
    kernels = _resolve_uncached(name, x, on_gpu)
    if name == "auto" or kernels.name == name:  # a fallback with a warning warns every time
        _LOADED[key] = kernels
    return kernels


def _resolve_uncached(name: str, x: torch.Tensor, on_gpu: bool) -> Optional[SimilarityKernels]:
    if x.dtype == torch.float64 and name in ("triton", "cuda"):
        raise TypeError(f"backend={name!r} takes fp16, bf16 or fp32 inputs; use backend='torch' "
                        "or 'reference' for float64")
    if name == "auto":
        if on_gpu and x.dtype != torch.float64:
            for probe in (_cuda_kernels, _triton_kernels):  # the first that loads wins
                kernels, _ = probe()
                if kernels is not None:
                    return kernels
        return _torch_kernels()
    if name == "torch":
        return _torch_kernels()
    if name == "triton":
        kernels, reason = _triton_kernels()
        if kernels is None:
            warnings.warn(f"backend='triton' asked for, but {reason}; using backend='torch'",
                          stacklevel=3)
            return _torch_kernels()
        if not on_gpu and not triton_interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors; to run the triton kernels on CPU tensors, "
                "set TRITON_INTERPRET=1 in the environment before importing clreg_fast "
                "(slow, meant for testing)"
            )
        return kernels
    # name == "cuda"
    if not on_gpu:
        raise ValueError("backend='cuda' needs CUDA tensors; use backend='torch' on CPU")
    kernels, reason = _cuda_kernels()
    if kernels is None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    return kernels

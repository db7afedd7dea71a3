"""``triton`` backend: fused Triton kernels for the projection, normalization and similarity.

Importing this package raises ImportError when triton is missing or older than 3.2; the
registry (``clreg_fast.backends``) then reports the backend as unavailable.
"""
import triton

_MIN_TRITON = (3, 2)


def _version_tuple(version: str):
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _version_tuple(triton.__version__) < _MIN_TRITON:
    raise ImportError(f"triton >= {'.'.join(map(str, _MIN_TRITON))} is needed, "
                      f"found {triton.__version__}")

from clreg_fast.backends.triton.ops import TritonKernels  # noqa: E402

__all__ = ["TritonKernels"]

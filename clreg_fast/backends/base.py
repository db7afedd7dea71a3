"""What a backend provides: the contract between the shared autograd function and the kernels.

The autograd function in ``clreg_fast.functional`` does the cheap O((Nf + Nr) x P) work itself
(positive term by per-label column sums, reductions, the projection GEMMs of the backward). A
backend supplies the expensive part, the forget-vs-all similarity, as two primitives that never
hold more than a tile (or a chunk) of the similarity matrix:

* ``lse_forward(za, zc, self_offset, scale, dot_dtype)``: for each anchor row ``i`` of ``za``,
  ``logsumexp_c (za_i . zc_c) * scale`` over the columns ``c`` of ``zc``, leaving out the pair
  ``c == i + self_offset`` (the anchor itself). Returns a float32 vector.
* ``lse_backward(za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype)``: with
  ``Pr_ic = exp(scale * za_i . zc_c - lse_i)`` (0 on the left-out pair),
  ``dza_i = scale * w_i * sum_c Pr_ic zc_c`` and, for the first ``n_grad_cols`` columns,
  ``dzc_c = scale * sum_i w_i Pr_ic za_i``. Columns past ``n_grad_cols`` need no gradient and
  their work is skipped; with ``need_dza=False`` the anchor pass is skipped too and ``dza`` is
  None (the distributed path needs only column gradients from some calls).

``za`` and ``zc`` are float32 normalized rows. ``dot_dtype`` is the dtype of the user's inputs:
a GPU kernel may round tiles to it (bf16/fp16) for tensor-core products with float32
accumulation; float32 inputs get float32 products (no TF32). A backend that rounds sets
``rounds_dot_operands``, so that the positive term, computed outside the kernels, is computed
from the same rounded rows (``dot_operands``).

``self_offset`` lets the same primitives serve a slice of a larger batch (the distributed path
calls them with anchors and columns that live on different ranks). A caller whose offset could
point into the wrong block of columns splits the call.

``project_normalize`` and ``normalize_backward`` have plain PyTorch defaults here; a backend
may fuse them.

Custom ops: every backend registers its kernels as ``torch.ops.clreg_fast.<backend>_<name>``
(schemas of tensors and scalars only) so that ``torch.compile`` sees them as single calls with
fake (shape-only) implementations. Eager calls skip the op dispatch and call the
implementation directly (it costs tens of microseconds per call in Python; see the per-call
overhead bench); ``route_through_ops(True)`` sends eager calls through the ops too (tests).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # the clamp of torch.nn.functional.normalize

_ROUTE_THROUGH_OPS = False


def tracing() -> bool:
    """Whether backend calls go through the registered custom ops: always while
    ``torch.compile``/``torch.export`` traces, in eager mode only under ``route_through_ops``."""
    return _ROUTE_THROUGH_OPS or torch.compiler.is_compiling()


@contextlib.contextmanager
def route_through_ops(enabled: bool = True):
    """Send eager backend calls through the custom ops (as a compiled graph calls them)."""
    global _ROUTE_THROUGH_OPS
    previous, _ROUTE_THROUGH_OPS = _ROUTE_THROUGH_OPS, enabled
    try:
        yield
    finally:
        _ROUTE_THROUGH_OPS = previous


class SimilarityKernels:
    """Base backend: PyTorch projection and normalization; subclasses add the similarity part."""

    name = "base"
    # True when lse_forward / lse_backward round z to a bf16/fp16 dot_dtype before multiplying.
    rounds_dot_operands = False

    def project_normalize(
        self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``z = y / max(||y||, eps)`` with ``y = x W^T + b``; float32 ``(z, ||y||)`` (float64 for float64)."""
        y = F.linear(x, weight, bias) if weight is not None else x
        y = y.double() if y.dtype == torch.float64 else y.float()  # float64 stays (gradcheck)
        norm = torch.linalg.vector_norm(y, dim=1)
        return y / norm.clamp_min(NORM_EPS)[:, None], norm

    def normalize_backward(self, dz: torch.Tensor, z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Gradient through the normalization; rows under the clamp get ``dz / eps`` as autograd does."""
        radial = (z * dz).sum(dim=1, keepdim=True) * (norm > NORM_EPS)[:, None]
        return (dz - z * radial) / norm.clamp_min(NORM_EPS)[:, None]

    def dot_operands(self, z: torch.Tensor, dot_dtype: torch.dtype) -> torch.Tensor:
        """``z`` as the similarity products see it (rounded to ``dot_dtype``), in ``z``'s dtype.

        The positive term is computed outside the kernels, from ``z . u_c``; it must use the
        operands that the kernels' scores use, or the two terms of the loss round differently
        and no longer cancel where they should (Nf = 2, Nr = 0 gives 0 only then).
        """
        if self.rounds_dot_operands and dot_dtype in (torch.bfloat16, torch.float16):
            return z.to(dot_dtype).to(z.dtype)  # round to nearest even, as the kernels do
        return z

    def lse_forward(self, za, zc, self_offset: int, scale: float, dot_dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def lse_backward(
        self, za, zc, lse, w, self_offset: int, scale: float, n_grad_cols: int,
        dot_dtype=torch.float32, need_dza: bool = True,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

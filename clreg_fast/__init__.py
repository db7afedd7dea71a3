"""clreg_fast: fused kernels for the CLReg contrastive unlearning regularizer.

Public API (see ``docs/clreg_spec.md`` and README.md):

* :func:`fused_clreg_loss` -- the loss, dispatched to a backend;
* :func:`clreg_loss_reference` -- the readable plain-PyTorch definition;
* :class:`CLRegLoss` -- the loss as an ``nn.Module`` with an optional projection head;
* :func:`available_backends` -- the backends usable in this process;
* :class:`RetainFeatureQueue` -- a ring buffer of retain features used as extra negatives.
"""
from clreg_fast.backends import available_backends
from clreg_fast.distributed import RetainFeatureQueue
from clreg_fast.functional import fused_clreg_loss
from clreg_fast.modules import CLRegLoss
from clreg_fast.reference import clreg_loss_reference

__version__ = "0.1.0"

__all__ = ["fused_clreg_loss", "clreg_loss_reference", "CLRegLoss", "available_backends",
           "RetainFeatureQueue", "__version__"]

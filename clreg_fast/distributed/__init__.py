"""CLReg past one GPU and one batch.

* :func:`distributed_clreg_loss` (also reached by ``fused_clreg_loss(..., process_group=pg)``):
  exact CLReg over the rows of every rank of a ``torch.distributed`` process group, with
  DDP/FSDP-ready gradients (see ``clreg_fast.distributed.loss`` for the convention).
* :class:`RetainFeatureQueue`: a MoCo-style ring buffer of normalized retain features from
  earlier steps, used as extra negatives and saved with a checkpoint.

Importing this package does not initialize ``torch.distributed``.
"""
from clreg_fast.distributed.loss import distributed_clreg_loss
from clreg_fast.distributed.queue import RetainFeatureQueue

__all__ = ["distributed_clreg_loss", "RetainFeatureQueue"]

"""Adapters that add CLReg to training frameworks users already run.

* :mod:`clreg_fast.integrations.hf` -- :class:`~clreg_fast.integrations.hf.CLRegMixin` for
  ``transformers.Trainer`` subclasses (e.g. OpenUnlearning's GradDiff, NPO, SimNPO, ...).
* :mod:`clreg_fast.integrations.hf_callback` --
  :class:`~clreg_fast.integrations.hf_callback.RepresentationMetricsCallback` logs the
  representation metrics of a fixed forget/retain probe set during training.

Nothing here is imported by ``import clreg_fast``; this package needs ``transformers`` only
when a trainer is actually built.
"""

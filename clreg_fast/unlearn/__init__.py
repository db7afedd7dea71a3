"""Unlearning for Hugging Face causal LMs with a CLReg term: data, methods, loop, metrics.

Kept apart from the kernels: nothing in ``clreg_fast`` outside this package imports it.
"""

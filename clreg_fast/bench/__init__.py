"""Benchmarks of the CLReg loss providers: ``python -m clreg_fast.bench`` (see benchmarks/README.md).

* :mod:`clreg_fast.bench.config` -- configurations, providers, presets (the sweep plans);
* :mod:`clreg_fast.bench.flops` -- the FLOP model behind the roofline columns;
* :mod:`clreg_fast.bench.measure` -- timing and GPU memory of one task in this process;
* :mod:`clreg_fast.bench.peak_rss` -- CPU peak RSS of one task in a child process;
* :mod:`clreg_fast.bench.sweep` -- a plan run within a time budget, OOM recorded, CSV row by row;
* :mod:`clreg_fast.bench.report` -- CSV, markdown and PNG outputs.

Nothing here is imported by ``import clreg_fast``; matplotlib and tqdm are imported only when a
report or a progress bar is made.
"""
from clreg_fast.bench.flops import flop_model
from clreg_fast.bench.peak_rss import measure_peak_rss

__all__ = ["flop_model", "measure_peak_rss"]

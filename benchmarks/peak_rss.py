"""Peak RSS of one CLReg forward + backward on CPU, in a fresh process; prints JSON.

    python benchmarks/peak_rss.py --provider torch --nf 4096 --nr 4096 --d 256 --p 128

The code lives in ``clreg_fast.bench.peak_rss`` (importable: ``measure_peak_rss(...)``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from clreg_fast.bench.peak_rss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

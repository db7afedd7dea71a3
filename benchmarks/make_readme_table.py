"""Print the README's benchmark table (markdown) from the committed results files only.

    python benchmarks/make_readme_table.py                 # every folder under benchmarks/results
    python benchmarks/make_readme_table.py --results DIR   # another results root

Each results folder (written by ``python -m clreg_fast.bench`` and stored with
``benchmarks/archive_results.py``) holds a results.csv; this script reads nothing else, so every
number in the README traces back to a committed measurement with its device, date and commit.
Per folder it prints the issue's targets (when the headline GPU configuration is there) and the
headline rows: the run's first configuration and the largest sizes of its group.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from clreg_fast.bench import report  # noqa: E402
from clreg_fast.bench.config import group_label  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent / "results"


def _speedup(rows, base: str, row) -> str:
    other = report._find(rows, base, report.config_key(row))
    if other is None or not report._ok(other) or other is row:
        return "-"
    return report.fmt_ratio(report._num(other, "fwd_bwd_ms") / report._num(row, "fwd_bwd_ms"))


def headline_keys(rows):
    """The run's first configuration, then the largest N of its group (any provider ok), then
    the largest N at which the eager reference still ran."""
    first = rows[0]
    group = report.group_of(first)
    keys = [report.config_key(first)]
    in_group = [r for r in rows if report.group_of(r) == group]
    ran = [r for r in in_group if report._ok(r)]
    ref_ran = [r for r in ran if r["provider"] == "reference"]
    oom_or_ran = [r for r in in_group if r["status"] in ("ok", "OOM")]
    for pool in (oom_or_ran, ran, ref_ran):
        if pool:
            key = report.config_key(max(pool, key=lambda r: (r["nf"], r["nr"])))
            if key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: (k[0], k[1]))


def folder_table(folder: Path) -> str:
    rows = report.read_csv(folder / "results.csv")
    if not rows:
        return f"_{folder.name}: empty results.csv_\n"
    first = rows[0]
    lines = [f"**{first['device']}**, {first['date_utc'][:10]}, commit `{first['git_commit']}`, "
             f"torch {first['torch_version']}, triton {first['triton_version']} "
             f"([{folder.name}](benchmarks/results/{folder.name}/results.md))", ""]
    checks = report.target_checks(rows)
    if checks:
        lines += ["| target (N = 8192, D = 4096, P = 256, bf16, fwd+bwd) | value | goal | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['value']} | {c['target']} | {c['verdict']} |" for c in checks]
        lines.append("")
    lines += ["| N = Nf = Nr | configuration | provider | fwd+bwd ms | peak memory increase | "
              "vs reference | vs compile | % of matmul rate |", "|---|---|---|---|---|---|---|---|"]
    for key in headline_keys(rows):
        label = group_label(key[2:])
        for row in sorted((r for r in rows if report.config_key(r) == key),
                          key=lambda r: report._provider_order(r["provider"])):
            if row["status"] == "unavailable":
                continue
            if not report._ok(row):
                lines.append(f"| {report.fmt_n(row['nf'])} | {label} | {row['provider']} | "
                             f"{row['status']} | | | | |")
                continue
            frac = report._num(row, "frac_of_matmul")
            lines.append(
                f"| {report.fmt_n(row['nf'])} | {label} | {row['provider']} | "
                f"{report.fmt_spread(row, 'fwd_bwd')} | "
                f"{report.fmt_mib(report._num(row, 'peak_increase_mib'))} | "
                f"{_speedup(rows, 'reference', row)} | {_speedup(rows, 'compile', row)} | "
                f"{report.fmt_num(100 * frac, '.1f', '%') if math.isfinite(frac) else '-'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_ROOT,
                        help="folder holding one sub-folder per run (default benchmarks/results)")
    args = parser.parse_args(argv)
    folders = sorted((p.parent for p in args.results.glob("*/results.csv")),
                     key=lambda p: p.name, reverse=True)
    if not folders:
        print(f"no results under {args.results}", file=sys.stderr)
        return 1
    gpu = [f for f in folders if report.read_csv(f / "results.csv")[:1]
           and report.read_csv(f / "results.csv")[0]["device_type"] == "cuda"]
    ordered = gpu + [f for f in folders if f not in gpu]  # GPU runs first, newest first
    print("\n".join(folder_table(f) for f in ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy one run's output folder into benchmarks/results/<date>_<device>_<commit>/ for committing.

    python benchmarks/archive_results.py /path/to/OUT [--commit abc123] [--dest benchmarks/results]

Copies results.csv, results.md, the PNG plots, meta.json, triton_tuning.json (the autotuned
launch table) and logs. ``--commit`` fills in the commit where the run recorded "unknown" (the
GPU machine's copy of the tree has no .git); it never overwrites a recorded commit.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clreg_fast.bench.env import slug  # noqa: E402

KEEP = ("results.csv", "results.md", "time_vs_n.png", "memory_vs_n.png", "meta.json",
        "triton_tuning.json")


def archive(src: Path, dest_root: Path, commit: str = "") -> Path:
    csv_path = src / "results.csv"
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        rows = list(reader)
    if not rows:
        raise SystemExit(f"{csv_path} has no rows")
    if commit:
        for row in rows:
            if row.get("git_commit", "unknown") in ("", "unknown"):
                row["git_commit"] = commit
    first = rows[0]
    device = first["device"].replace("NVIDIA ", "")
    name = f"{first['date_utc'][:10]}_{slug(device)[:40]}_{slug(first['git_commit'])}"
    dest = dest_root / name
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in KEEP or item.suffix == ".log":
            shutil.copy2(item, dest / item.name)
    if commit:
        with open(dest / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        from clreg_fast.bench import report

        report.write_reports(report.read_csv(dest / "results.csv"), dest)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the run's output folder (holds results.csv)")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--commit", default="", help="commit to record where the run has none")
    args = parser.parse_args(argv)
    print(archive(args.src, args.dest, args.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())

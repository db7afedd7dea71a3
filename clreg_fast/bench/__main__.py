"""``python -m clreg_fast.bench``: the benchmark sweep (see benchmarks/README.md).

Examples::

    python -m clreg_fast.bench --preset cpu --out benchmarks/results/cpu-2026-11-28
    python -m clreg_fast.bench --preset gpu --budget-s 240 --out $OUT
    python -m clreg_fast.bench --n 1k,4k --d 1024 --p 128,none --dtype fp32 --providers reference,torch
    python -m clreg_fast.bench --preset gpu --dry-run          # print the plan only
    python -m clreg_fast.bench report --csv DIR/results.csv    # redo results.md and the PNGs
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import List, Optional

from clreg_fast.bench import config as cfg

PRESET_TIMING = {  # warmup, reps, min_reps, rep_time_s, budget_s
    "gpu": (2, 20, 3, 1.0, None),
    "cpu": (1, 5, 2, 3.0, 300.0),
    "tiny": (1, 3, 2, 0.5, None),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clreg_fast.bench",
                                description="Time and memory of the CLReg loss providers.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESET_TIMING),
                   help="a ready-made plan (default: gpu with a GPU, else cpu)")
    p.add_argument("--n", help="custom grid: rows per side Nf = Nr, e.g. 1k,2k,4k (replaces the "
                               "preset's plan)")
    p.add_argument("--d", help="custom grid: feature sizes, e.g. 2048,4096")
    p.add_argument("--p", help="custom grid: projection sizes, e.g. 128,256,none")
    p.add_argument("--dtype", help="custom grid: bf16,fp16,fp32")
    p.add_argument("--labels", help="custom grid: on,off")
    p.add_argument("--retain", help="custom grid: grad,detached")
    p.add_argument("--providers", help=f"comma list from {','.join(cfg.PROVIDERS)} "
                                       "(filters a preset; default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--out", type=Path, help="output folder (default runs/bench-<time>)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the sweep in seconds; "
                                                  "tasks predicted to overrun it are skipped")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int, help="most timed repetitions per task")
    p.add_argument("--min-reps", type=int, help="fewest timed repetitions per task")
    p.add_argument("--rep-time-s", type=float, help="stop repeating after this many seconds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: only on a terminal)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def plan_from_args(args, device_type: str) -> List[cfg.Task]:
    providers = cfg.parse_providers(args.providers) if args.providers else None
    custom = any(getattr(args, k) for k in ("n", "d", "p", "dtype", "labels", "retain"))
    if custom:
        gpu = device_type == "cuda"
        jobs = cfg.custom_jobs(
            cfg.parse_sizes(args.n or ("8k" if gpu else "2k"), "--n"),
            cfg.parse_sizes(args.d or ("4096" if gpu else "1024"), "--d"),
            cfg.parse_projections(args.p or ("256" if gpu else "128")),
            cfg.parse_dtypes(args.dtype or ("bf16" if gpu else "fp32")),
            cfg.parse_labels(args.labels or "off"),
            cfg.parse_retain(args.retain or "grad"),
            providers or list(cfg.PROVIDERS),
        )
    else:
        jobs = cfg.preset_jobs(args.preset, providers)
    return cfg.expand(jobs)


def report_main(argv: List[str]) -> int:
    from clreg_fast.bench import report

    p = argparse.ArgumentParser(prog="python -m clreg_fast.bench report",
                                description="Rewrite results.md and the PNG plots from a CSV.")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--out", type=Path, help="default: the CSV's folder")
    args = p.parse_args(argv)
    rows = report.read_csv(args.csv)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    written = report.write_reports(rows, out)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    args = build_parser().parse_args(argv)

    import torch

    from clreg_fast.bench.sweep import SweepOptions, run_sweep

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no GPU", file=sys.stderr)
        return 2
    device = torch.device(device_type)
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.preset is None:
        args.preset = "gpu" if device_type == "cuda" else "cpu"
    try:
        tasks = plan_from_args(args, device_type)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warmup, reps, min_reps, rep_time_s, budget_s = PRESET_TIMING[args.preset]
    opts = SweepOptions(
        warmup=args.warmup if args.warmup is not None else warmup,
        reps=args.reps if args.reps is not None else reps,
        min_reps=args.min_reps if args.min_reps is not None else min_reps,
        rep_time_s=args.rep_time_s if args.rep_time_s is not None else rep_time_s,
        memory=not args.no_memory,
        isolate_memory=device_type == "cpu",
        budget_s=args.budget_s if args.budget_s is not None else budget_s,
        seed=args.seed,
        progress=args.progress,
    )
    if opts.min_reps > opts.reps:
        print("error: --min-reps is larger than --reps", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            print(f"plan: {len(tasks)} tasks on {device_type}, preset {args.preset}, budget "
                  f"{opts.budget_s if opts.budget_s is not None else 'none'} s")
            for i, task in enumerate(tasks, 1):
                print(f"{i:4d}. {task.provider:<14} {task.config.short()}")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head` closed the pipe: fine for a listing
            sys.stdout = open(os.devnull, "w")
        return 0
    out = args.out or Path("runs") / f"bench-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        from tqdm.auto import tqdm

        log = tqdm.write
    except ImportError:
        log = print
    rows = run_sweep(tasks, device, out, opts, log=log)
    failed = [r for r in rows if r["status"] == "error"]
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

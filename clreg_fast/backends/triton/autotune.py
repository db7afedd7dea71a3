"""Time the candidate launch configurations on this GPU and write a tuning table, in one call.

    python -m clreg_fast.backends.triton.autotune --budget-s 120 --out triton_tuning.json
    CLREG_TRITON_TUNING=triton_tuning.json python my_training.py   # the launchers read it
    python -m clreg_fast.backends.triton.autotune --dry-run        # the plan, no GPU needed

For each shape class (input kind, feature tile) in priority order, at the benchmark's headline
shape (8192 anchors against 16384 columns), each similarity kernel's candidates
(``tuning.candidates``) are run once (compiling them), checked against the default
configuration's result, and timed with ``triton.testing.do_bench``; the fastest correct one is
recorded, the default unless a candidate beats it by more than ``--margin``; a kernel whose
default fails to compile or run keeps no entry and its other candidates are skipped. The time budget is
checked before every candidate: classes not reached keep the defaults, and the table says which
classes were measured. Tables are read once per device by the launchers (``tuning.load_table``)
and only where the device name, compute capability and triton version match.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from clreg_fast.backends.triton import ops, tuning
from clreg_fast.backends.triton.tuning import KernelConfig

# (kind, P) in priority order: the benchmark's headline group first (bf16, P = 256), then its
# one-factor variants (P = 128, float32).
DEFAULT_CLASSES = (("bf16", 256), ("bf16", 128), ("fp32", 256), ("fp16", 256), ("fp32", 128))
DTYPE_OF_KIND = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}
SCALE = 10.0  # 1 / tau at the default temperature
# A candidate whose output differs from the default configuration's by more than this (relative
# to the output's largest entry) is reported as wrong and never chosen.
AGREEMENT = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 2e-2, "fp16": 5e-3}

Timer = Callable[[Callable[[], object], KernelConfig], float]


def cuda_timer(fn: Callable[[], object], cfg: KernelConfig) -> float:
    """Milliseconds per call (median of CUDA-event timings; the first call compiled it)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


def _unit_rows(n: int, p: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, p, generator=g), dim=1).to(device)


def _runner(kernels: ops.TritonKernels, kernel: str, za, zc, lse, w, dot_dtype):
    """A callable running one kernel of the backward or forward with a given config."""
    if kernel == "lse_forward":
        return lambda cfg: kernels.lse_forward(za, zc, 0, SCALE, dot_dtype, config=cfg)
    if kernel == "lse_backward_rows":
        return lambda cfg: kernels.lse_backward(za, zc, lse, w, 0, SCALE, 0, dot_dtype,
                                                rows_config=cfg)[0]
    return lambda cfg: kernels.lse_backward(za, zc, lse, w, 0, SCALE, zc.shape[0], dot_dtype,
                                            need_dza=False, cols_config=cfg)[1]


def _agrees(got: torch.Tensor, want: torch.Tensor, kind: str) -> bool:
    scale = want.abs().max().clamp_min(1e-30)
    return bool(torch.isfinite(got).all()) and ((got - want).abs().max() / scale).item() <= \
        AGREEMENT[kind]


def tune(classes: Sequence[Tuple[str, int]], n_rows: int, n_cols: int, budget_s: float,
         device, timer: Timer = cuda_timer, margin: float = 0.03, log=print,
         clock: Callable[[], float] = time.monotonic,
         on_progress: Optional[Callable[[Dict[str, dict], List[dict]], None]] = None
         ) -> Tuple[Dict[str, dict], List[dict]]:
    """Measure every candidate of every class while the budget lasts.

    ``on_progress(entries, timings)`` is called after each kernel of each class (the command
    rewrites its table then, so a run killed from outside still leaves what it measured).

    Returns (entries: shape class -> chosen config and timings, for the measured classes only;
    timings: one record per candidate run, including the wrong and the skipped ones).
    """
    start = clock()
    entries: Dict[str, dict] = {}
    timings: List[dict] = []
    for kind, p in classes:
        kernels = ops.TritonKernels(allow_tf32=kind == "tf32")
        dtype = DTYPE_OF_KIND[kind]
        block_p, k_tiles = ops._feature_block(p, kernels.max_block_p)
        za = _unit_rows(n_rows, p, device, seed=p)
        zc = torch.cat([za, _unit_rows(n_cols - n_rows, p, device, seed=p + 1)])
        w = torch.full((n_rows,), 1.0 / n_rows, device=device)
        lse = kernels.lse_forward(za, zc, 0, SCALE, dtype)
        for kernel in tuning.SIMILARITY_KERNELS:
            key = tuning.shape_class(kernel, kind, block_p, k_tiles)
            run = _runner(kernels, kernel, za, zc, lse, w, dtype)
            cands = tuning.candidates(kernel, kind, block_p, k_tiles)
            reference = None
            results = []
            default_failed = False
            for cfg in cands:  # the default comes first: it is the yardstick
                elapsed = clock() - start
                if elapsed > budget_s or default_failed:
                    # Without the default's result and time no candidate can be checked or
                    # chosen: the rest of the class would spend the budget for nothing.
                    timings.append(dict(shape_class=key, config=cfg.to_dict(), status="skipped"))
                    continue
                record = dict(shape_class=key, config=cfg.to_dict())
                try:
                    out = run(cfg)  # compiles on first use
                    if reference is None:
                        reference = out.clone()
                    elif not _agrees(out, reference, kind):
                        record["status"] = "wrong"
                        log(f"autotune: {key} {cfg}: result differs from the default's; "
                            "never chosen (a kernel bug to report)")
                        timings.append(record)
                        continue
                    record.update(status="ok", ms=timer(lambda: run(cfg), cfg))
                except Exception as exc:  # a candidate that fails to compile or run is skipped
                    record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
                    log(f"autotune: {key} {cfg}: {record['error']}")
                timings.append(record)
                if record.get("status") == "ok":
                    results.append((record["ms"], cfg))
                elif cfg == cands[0]:
                    default_failed = True
            measured = dict((c, ms) for ms, c in results)
            default = cands[0]
            if default not in measured:
                if on_progress is not None:
                    on_progress(entries, timings)
                continue  # not measured (budget, or the default failed): launchers keep defaults
            best_ms, best = min(results, key=lambda item: item[0])
            if best_ms > measured[default] * (1.0 - margin):
                best, best_ms = default, measured[default]
            entries[key] = dict(config=best.to_dict(), ms=best_ms, default_ms=measured[default],
                                candidates_timed=len(results), candidates=len(cands))
            log(f"autotune: {key}: {best} {best_ms:.3f} ms (default {default} "
                f"{measured[default]:.3f} ms, {len(results)}/{len(cands)} timed)")
            if on_progress is not None:
                on_progress(entries, timings)
    return entries, timings


def _parse_classes(items: Sequence[str]) -> List[Tuple[str, int]]:
    out = []
    for item in items:
        kind, _, p = item.partition(":")
        if kind not in tuning.KINDS or not p.isdigit() or int(p) < 1:
            raise argparse.ArgumentTypeError(f"a class is KIND:P with KIND in {tuning.KINDS}, "
                                             f"got {item!r}")
        out.append((kind, int(p)))
    return out


def _tuning_device() -> Optional[torch.device]:
    """The current CUDA device, or None where compiled kernels cannot run."""
    if ops.INTERPRET or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("triton_tuning.json"))
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--classes", nargs="+", default=[f"{k}:{p}" for k, p in DEFAULT_CLASSES],
                        help="KIND:P in priority order (KIND: fp32, tf32, bf16, fp16)")
    parser.add_argument("--rows", type=int, default=8192, help="anchors")
    parser.add_argument("--cols", type=int, default=16384, help="columns (anchors + retain)")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="a candidate must beat the default by this fraction")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    try:
        classes = _parse_classes(args.classes)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.cols < args.rows or args.rows < 1:
        parser.error("--cols must be >= --rows >= 1")
    if args.dry_run:
        for kind, p in classes:
            block_p, k_tiles = ops._feature_block(p, ops.MAX_BLOCK_P)
            for kernel in tuning.SIMILARITY_KERNELS:
                n = len(tuning.candidates(kernel, kind, block_p, k_tiles))
                print(f"{tuning.shape_class(kernel, kind, block_p, k_tiles)}: {n} candidates")
        return 0
    device = _tuning_device()
    if device is None:
        print("autotune: no CUDA device (or TRITON_INTERPRET=1): nothing to tune, no table "
              "written", file=sys.stderr)
        return 0
    t0 = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(entries: Dict[str, dict], timings: List[dict]) -> None:
        extra = dict(created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), budget_s=args.budget_s, seconds=round(time.monotonic() - t0, 1),
            shape=dict(rows=args.rows, cols=args.cols, scale=SCALE), margin=args.margin,
            timings=timings)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(tuning.make_table(device.index, entries, extra), indent=1) + "\n")
        tmp.replace(args.out)  # atomic: a reader never sees half a table

    entries, timings = tune(classes, args.rows, args.cols, args.budget_s, device,
                            timer=cuda_timer, margin=args.margin, on_progress=write)
    write(entries, timings)
    print(f"autotune: {len(entries)} kernel shape classes measured in "
          f"{time.monotonic() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a plan of tasks within a wall-clock budget and write CSV rows as they complete.

Order matters: tasks run in plan order, so the presets put the most important configurations
first. Before each task the sweep decides whether to run it:

* a provider that ran out of memory at a smaller N of the same group is not run at larger N
  (recorded as OOM, "not run");
* torch.compile variants are not run where one (Nf, Nf + Nr) float32 matrix alone is larger than
  the device (recorded as OOM, "not run"): compiling first would only waste the budget;
* a task whose predicted cost (from the same provider's earlier timings, scaled by the FLOP
  model with the growth rate seen so far, plus the compile time where there is one) exceeds the
  remaining budget is skipped (recorded as "skipped"), except an eager task whose matrix alone
  exceeds the device: it fails at its first allocation, so its OOM is recorded for free.

Everything else runs and is recorded: "ok", "OOM", "error" (the message is kept) or
"unavailable" (the provider is not usable here). One failing task never ends the sweep; a lost
CUDA context (sticky error) does, with the remaining tasks recorded as skipped.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from clreg_fast.bench import report
from clreg_fast.bench.config import MATERIALIZING, Task
from clreg_fast.bench.flops import flop_model, matrix_bytes, roofline
from clreg_fast.bench.measure import MIB, device_alive, matmul_rate, measure_task

COMPILE_GUESS_S = 40.0  # cost of a first torch.compile before one was seen in this run
CHILD_START_S = 5.0     # starting a Python child that imports torch (CPU memory measurement)


@dataclasses.dataclass
class SweepOptions:
    warmup: int = 1
    reps: int = 10
    min_reps: int = 3
    rep_time_s: float = 2.0
    memory: bool = True
    isolate_memory: bool = False   # CPU: measure peak RSS in a child process per task
    budget_s: Optional[float] = None
    seed: int = 0
    progress: Optional[bool] = None  # None: a bar only on a terminal


class CostModel:
    """Predicts a task's seconds from the same provider's earlier tasks in this run."""

    def __init__(self):
        self.points: Dict[str, List[tuple]] = {}   # provider -> [(group, flops, seconds per run)]
        self.first_call: Dict[str, float] = {}

    def add(self, task: Task, seconds_per_run: float, first_call_s: Optional[float]) -> None:
        flops = flop_model(task.config)["fwd_bwd"]
        self.points.setdefault(task.provider, []).append(
            (task.config.group_key(), flops, seconds_per_run))
        if first_call_s is not None and math.isfinite(first_call_s):
            self.first_call[task.provider] = first_call_s

    def per_run(self, task: Task) -> Optional[float]:
        points = self.points.get(task.provider)
        if not points:
            return None
        flops = flop_model(task.config)["fwd_bwd"]
        same = [pt for pt in points if pt[0] == task.config.group_key()]
        exponent = 1.0
        if len(same) >= 2:
            (_, f0, t0), (_, f1, t1) = sorted(same, key=lambda pt: pt[1])[-2:]
            if f1 > f0 and t0 > 0 and t1 > 0:
                exponent = min(1.6, max(0.7, math.log(t1 / t0) / math.log(f1 / f0)))
        pool = same or points
        _, f_near, t_near = min(pool, key=lambda pt: abs(math.log(pt[1] / flops)))
        return t_near * (flops / f_near) ** (exponent if flops > f_near else 1.0)

    def predict(self, task: Task, runs: int) -> Optional[float]:
        per_run = self.per_run(task)
        compile_s = 0.0
        if task.provider.startswith("compile"):
            compile_s = self.first_call.get(task.provider, COMPILE_GUESS_S)
        if per_run is None:
            return compile_s or None
        return compile_s + runs * per_run


def _device_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def measure_matmul_rates(tasks: Sequence[Task], device: torch.device, log=print) -> Dict[str, float]:
    """FLOP/s of a large square matmul for each dtype of the plan (bf16 always on GPU)."""
    from clreg_fast.bench.config import DTYPES

    dtypes = {t.config.dtype for t in tasks}
    if device.type == "cuda":
        dtypes.add("bf16")
    rates = {}
    for name in sorted(dtypes):
        try:
            rates[name] = matmul_rate(device, DTYPES[name])
            log(f"matmul rate {name}: {rates[name] / 1e12:.2f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            log(f"matmul rate {name}: failed ({exc})")
            rates[name] = math.nan
    return rates


def _memory_in_child(task: Task, opts: SweepOptions) -> Dict[str, object]:
    from clreg_fast.bench.peak_rss import run_child

    spec = {"config": task.config.to_dict(), "provider": task.provider, "seed": opts.seed,
            "warmup": True, "threads": torch.get_num_threads()}
    res = run_child(spec)
    out: Dict[str, object] = {"mem_method": "peak RSS (child process)"}
    if res.get("status") != "ok":
        out["mem_status"] = res.get("status", "error")
        out["mem_note"] = res.get("note", "")
        return out
    out.update(
        mem_status="ok",
        mem_base_mib=res["baseline_rss_bytes"] / MIB,
        peak_mib=res["peak_rss_bytes"] / MIB,
        peak_increase_mib=res["increase_bytes"] / MIB,
        fwd_peak_increase_mib=res["fwd_increase_bytes"] / MIB,
        saved_mib=res["saved_bytes"] / MIB,
        loss=res["loss"],
    )
    return out


def _add_derived(row: Dict[str, object], task: Task, rates: Dict[str, float]) -> None:
    flops = flop_model(task.config)
    row["flops_fwd"], row["flops_bwd"], row["flops_fwd_bwd"] = (
        flops["fwd"], flops["bwd"], flops["fwd_bwd"])
    rate = rates.get(task.config.dtype, math.nan)
    row["matmul_dtype"] = task.config.dtype
    row["matmul_tflops"] = rate / 1e12
    if row.get("status") != "ok":
        return
    for part in ("fwd", "bwd", "fwd_bwd"):
        ms = row.get(f"{part}_ms")
        r = roofline(flops[part], (ms or math.nan) / 1e3, rate)
        row[f"tflops_{part}"] = r["tflops"]
        if part == "fwd_bwd":
            row["frac_of_matmul"] = r["frac_of_matmul"]
            row["x_roofline_floor"] = r["x_roofline_floor"]


def _pre_check(task: Task, device: torch.device, oom_at: Dict[tuple, int]) -> Optional[Dict]:
    """Status and note for a task that need not run, else None."""
    key = (task.provider, task.config.group_key())
    if key in oom_at and task.config.n >= oom_at[key]:
        n_side = oom_at[key] // 2
        return {"status": "OOM", "note": f"not run: out of memory at a smaller size "
                                          f"(N={n_side} per side) in this group"}
    total = _device_bytes(device)
    if (task.provider.startswith("compile") and total is not None
            and matrix_bytes(task.config, 4) > total):
        need = matrix_bytes(task.config, 4) / 2**30
        return {"status": "OOM", "note": f"not run: one (Nf, Nf+Nr) float32 matrix alone needs "
                                          f"{need:.0f} GiB, more than the device's "
                                          f"{total / 2**30:.0f} GiB"}
    return None


def _fails_at_once(task: Task, device: torch.device) -> bool:
    """An eager task whose similarity matrix alone exceeds the device: its out-of-memory error
    comes at the first large allocation, so it is run (and recorded) whatever the budget."""
    total = _device_bytes(device)
    if total is None or task.provider not in ("reference", "eager_native"):
        return False
    element = 4 if task.provider == "reference" else task.config.torch_dtype.itemsize
    return matrix_bytes(task.config, element) > total


def run_sweep(tasks: Sequence[Task], device: torch.device, out_dir: Path, opts: SweepOptions,
              log: Callable[[str], None] = print) -> List[Dict[str, object]]:
    """Measure ``tasks`` in order; write ``results.csv`` row by row, then markdown and plots."""
    from clreg_fast.bench import env

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    meta = env.collect(device)
    log(f"device: {meta['device']} | torch {meta['torch_version']} | triton "
        f"{meta['triton_version']} | commit {meta['git_commit']} | backends {meta['backends']}")
    rates = measure_matmul_rates(tasks, device, log)
    meta_extra = {f"matmul_tflops_{k}": f"{v / 1e12:.2f}" for k, v in rates.items()}
    report.write_meta(out_dir / "meta.json", {**meta, **meta_extra, "n_tasks": len(tasks),
                                              "budget_s": opts.budget_s})
    writer = report.CsvWriter(out_dir / "results.csv")
    costs = CostModel()
    oom_at: Dict[tuple, int] = {}
    rows: List[Dict[str, object]] = []
    dead: Optional[str] = None
    runs_per_task = max(1, opts.warmup) + (1 if opts.memory else 0) + opts.min_reps

    bar = _progress(len(tasks), opts.progress)
    for index, task in enumerate(tasks, 1):
        bar.set_postfix_str(f"{task.provider} {task.config.short()}")
        elapsed = time.perf_counter() - t_begin
        row: Optional[Dict[str, object]] = None
        pre = _pre_check(task, device, oom_at)
        if dead is not None:
            pre = {"status": "skipped", "note": f"not run: the device failed earlier ({dead})"}
        if pre is None and opts.budget_s is not None and not _fails_at_once(task, device):
            remaining = opts.budget_s - elapsed
            predicted = costs.predict(task, runs_per_task + (2 if opts.isolate_memory else 0))
            if predicted is not None and opts.isolate_memory:
                predicted += CHILD_START_S
            if remaining <= 0 or (predicted is not None and predicted > remaining):
                pre = {"status": "skipped",
                       "note": f"not run: predicted {predicted or 0:.0f} s, over the remaining "
                               f"budget of {max(remaining, 0):.0f} s"}
        if pre is not None:
            from clreg_fast.bench.measure import empty_result

            row = empty_result(task)
            row.update(pre)
        else:
            mem: Dict[str, object] = {}
            if opts.memory and opts.isolate_memory:
                mem = _memory_in_child(task, opts)
            if mem.get("mem_status") in ("OOM", "error", "timeout", "unavailable"):
                from clreg_fast.bench.measure import empty_result

                row = empty_result(task)
                row.update(status=mem["mem_status"], note=str(mem.get("mem_note", "")),
                           mem_method=mem["mem_method"])
            else:
                row = measure_task(task, device, warmup=opts.warmup, reps=opts.reps,
                                   min_reps=opts.min_reps, rep_time_s=opts.rep_time_s,
                                   memory=opts.memory and not opts.isolate_memory, seed=opts.seed)
                mem.pop("mem_status", None)
                mem.pop("mem_note", None)
                if row["status"] == "ok":
                    row.update(mem)
            if row["status"] == "ok":
                costs.add(task, row["fwd_bwd_ms"] / 1e3, row.get("first_call_s"))
            elif row["status"] == "OOM":
                key = (task.provider, task.config.group_key())
                oom_at[key] = min(oom_at.get(key, task.config.n), task.config.n)
            elif row["status"] == "error" and device.type == "cuda":
                dead = device_alive(device)
        _add_derived(row, task, rates)
        row.update(meta)
        writer.write(row)
        rows.append(row)
        bar.update(1)
        _log_row(log, index, len(tasks), row)
    bar.close()
    writer.close()
    # Markdown and plots from the CSV as written, so `bench report --csv` reproduces them exactly.
    report.write_reports(report.read_csv(out_dir / "results.csv"), out_dir, log=log)
    log(f"sweep done in {time.perf_counter() - t_begin:.0f} s; results in {out_dir}")
    return rows


def _log_row(log, index: int, total: int, row: Dict[str, object]) -> None:
    cfg = f"N={row['nf']}/{row['nr']} D={row['d']} P={row['p'] if row['p'] is not None else 'none'}" \
          f" {row['dtype']}{' labels' if row['labels'] else ''}" \
          f"{' detached' if row['retain_detached'] else ''}"
    head = f"[{index}/{total}] {row['provider']:<14} {cfg:<44}"
    if row["status"] == "ok":
        mem = row.get("peak_increase_mib")
        mem_text = f" | peak +{mem:.1f} MiB" if isinstance(mem, float) and math.isfinite(mem) else ""
        floor = row.get("x_roofline_floor")
        floor_text = f" | {floor:.2f}x floor" if isinstance(floor, float) and math.isfinite(floor) else ""
        log(f"{head} fwd {row['fwd_ms']:.3f} ms, bwd {row['bwd_ms']:.3f} ms, fwd+bwd "
            f"{row['fwd_bwd_ms']:.3f} ms{mem_text}{floor_text}")
    else:
        log(f"{head} {row['status']}: {row.get('note', '')}")


class _NoBar:
    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: Optional[bool]):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="clreg bench", unit="task",
                disable=(None if enabled is None else not enabled))

"""Measure one task in this process: time (median and quartiles) and, on GPU, peak memory.

Timing: after warm-up, each repetition records three marks around one forward and one backward
(CUDA events on GPU, ``time.perf_counter`` on CPU, where every op is synchronous), so
``fwd`` covers the forward pass alone (inputs require grad, so it builds the graph as in
training, but no backward work), ``bwd`` the backward pass alone, and ``fwd_bwd`` both.
Gradients are set to None before each repetition, as ``zero_grad(set_to_none=True)`` does.

GPU memory: one extra forward + backward between ``reset_peak_memory_stats`` and
``max_memory_allocated``; the increase is measured over what was allocated before it (the
inputs). CPU memory needs a separate process per measurement (``peak_rss.py``).

Out-of-memory (``torch.cuda.OutOfMemoryError``, ``MemoryError``, or a backend's RuntimeError
saying "out of memory") is recorded as status "OOM", never raised.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Dict, List, Optional

import torch

from clreg_fast.bench.config import Task
from clreg_fast.bench.providers import (availability, clear_grads, make_inputs, make_loss_fn,
                                        tensor_bytes)

MIB = 2.0 ** 20


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text
                                              or "failed to allocate" in text)


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quartiles(values: List[float]) -> Dict[str, float]:
    """Median and the 25th/75th percentiles (inclusive method; fine for 2 or more values)."""
    if not values:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan}
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3}


def time_reps(fn, inputs, device: torch.device, reps: int, min_reps: int, rep_time_s: float
              ) -> Dict[str, List[float]]:
    """Per-repetition forward, backward and forward+backward milliseconds."""
    out = {"fwd": [], "bwd": [], "fwd_bwd": []}
    start = time.perf_counter()
    for i in range(reps):
        clear_grads(inputs)
        _sync(device)
        if device.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            loss = fn(inputs)
            marks[1].record()
            loss.backward()
            marks[2].record()
            marks[2].synchronize()
            fwd, bwd = marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
        else:
            t0 = time.perf_counter()
            loss = fn(inputs)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd, bwd = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        del loss
        out["fwd"].append(fwd)
        out["bwd"].append(bwd)
        out["fwd_bwd"].append(fwd + bwd)
        if i + 1 >= min_reps and time.perf_counter() - start > rep_time_s:
            break
    return out


def cuda_memory_pass(fn, inputs, device: torch.device) -> Dict[str, float]:
    """Peak allocated bytes of one forward + backward, absolute and over the state before it."""
    clear_grads(inputs)
    gc.collect()
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = fn(inputs)
    _sync(device)
    after_fwd = torch.cuda.memory_allocated(device)
    peak_fwd = torch.cuda.max_memory_allocated(device)
    loss.backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    value = float(loss.detach())
    del loss
    return {"mem_base_mib": base / MIB, "peak_mib": peak / MIB,
            "peak_increase_mib": (peak - base) / MIB,
            "fwd_peak_increase_mib": (peak_fwd - base) / MIB,
            "saved_mib": (after_fwd - base) / MIB, "loss": value,
            "mem_method": "cuda max_memory_allocated"}


def empty_result(task: Task) -> Dict[str, object]:
    row: Dict[str, object] = {"provider": task.provider, "status": "", "note": ""}
    row.update(task.config.to_dict())
    return row


def measure_task(task: Task, device: torch.device, *, warmup: int = 1, reps: int = 10,
                 min_reps: int = 3, rep_time_s: float = 2.0, memory: bool = True,
                 seed: int = 0) -> Dict[str, object]:
    """Time (and on GPU, memory) of one task; never raises for OOM or a failing provider."""
    row = empty_result(task)
    ok, why = availability(task.provider, device)
    if not ok:
        row.update(status="unavailable", note=why)
        return row
    inputs = fn = loss = None
    t_start = time.perf_counter()
    try:
        inputs = make_inputs(task.config, device, seed)
        row["inputs_mib"] = tensor_bytes(inputs) / MIB
        fn = make_loss_fn(task.provider, task.config)
        for i in range(max(1, warmup)):
            clear_grads(inputs)
            t0 = time.perf_counter()
            loss = fn(inputs)
            loss.backward()
            _sync(device)
            if i == 0:
                row["first_call_s"] = time.perf_counter() - t0  # compile / autotune included
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"loss is {float(loss.detach())}")
            del loss
        if memory and device.type == "cuda":
            row.update(cuda_memory_pass(fn, inputs, device))
        times = time_reps(fn, inputs, device, reps, min_reps, rep_time_s)
        for part, values in times.items():
            stats = quartiles(values)
            row[f"{part}_ms"] = stats["median"]
            row[f"{part}_ms_q1"] = stats["q1"]
            row[f"{part}_ms_q3"] = stats["q3"]
        row["reps"] = len(times["fwd"])
        row["status"] = "ok"
    except Exception as exc:  # recorded, so that one failing config does not end the sweep
        row["status"] = "OOM" if is_oom(exc) else "error"
        row["note"] = short_error(exc)
    finally:
        # Drop the graph of a forward that failed in its backward too, before freeing the cache.
        inputs = fn = loss = None
        free_memory(device)
    row["wall_s"] = time.perf_counter() - t_start
    return row


def device_alive(device: torch.device) -> Optional[str]:
    """None if the device still computes; else the error (a sticky CUDA error poisons the process)."""
    try:
        x = torch.ones(4, device=device)
        float((x + 1).sum())
        return None
    except Exception as exc:  # noqa: BLE001 - any failure here means the context is gone
        return short_error(exc)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                reps: int = 20) -> float:
    """Measured FLOP/s of a square ``torch.matmul`` on random data: the best of ``reps``.

    The best repetition, not the median: this is the ceiling of the roofline, and on a shared
    machine other work only ever slows a repetition down. float32 is measured with TF32 off,
    as the fused kernels compute float32 inputs.
    """
    if size is None:
        # CPU: 512 fits the per-core caches; at 1024 a busy shared L3 halved the fp32 rate here
        size = 8192 if device.type == "cuda" else 512
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen, device=device, dtype=dtype)
    flops = 2.0 * size ** 3
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(3):
            torch.matmul(a, b)
        _sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                torch.matmul(a, b)
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            else:
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return flops / min(times)

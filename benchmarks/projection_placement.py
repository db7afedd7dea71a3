"""Where the projection head runs: inside the fused loss or as a module before it (CPU).

``CLRegMixin`` calls its head as an ``nn.Linear`` module and passes the projected rows to
``fused_clreg_loss`` without a weight, so that DeepSpeed ZeRO-3 and FSDP gather the head as any
layer; ``CLRegLoss`` does so only when its projection is sharded. This measures what that costs
against the fused path (``fused_clreg_loss(forget, retain, weight, bias)``) at the mixin's row
counts: per-device batch rows with mean/last pooling (4 to 64), answer tokens with token pooling
(hundreds to a few thousand), hidden sizes of 1B-8B models, a 256-wide head, float32, retain
rows detached (the head still gets their gradient), forward + backward.

    python benchmarks/projection_placement.py --threads 1 \
        --out benchmarks/results/projection-cpu-$(date +%F)

Writes ``results.csv`` (one row per configuration and path: median and quartiles of the
forward + backward time in ms over the repetitions, and the largest difference of the loss and
of the head's gradient between the paths) and ``env.txt``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch
from torch import nn

from clreg_fast import fused_clreg_loss

CONFIGS = [  # (forget rows, retain rows, hidden size) as the mixin sees them
    (4, 4, 2048), (8, 8, 2048), (16, 16, 4096), (32, 32, 4096), (64, 64, 4096),
    (512, 512, 4096), (2048, 2048, 4096),
]
PROJ = 256


def _fused(head, f, r, labels):
    return fused_clreg_loss(f, r, head.weight, head.bias, labels=labels, backend="torch")


def _module(head, f, r, labels):
    projected = head(torch.cat([f, r]))
    return fused_clreg_loss(projected[: f.shape[0]], projected[f.shape[0]:], labels=labels,
                            backend="torch")


PATHS = {"fused": _fused, "module": _module}


def _time_paths(head, f, r, labels, reps: int):
    """Median and quartiles per path; the paths alternate, so load on the shared CPU drifts
    into both series alike."""
    times = {name: [] for name in PATHS}
    for i in range(reps + 2):
        for name, fn in PATHS.items():
            head.zero_grad(set_to_none=True)
            f.grad = None
            start = time.perf_counter()
            fn(head, f, r, labels).backward()
            if i >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, series in times.items():
        q = statistics.quantiles(series, n=4) if len(series) > 1 else series * 3
        out[name] = (statistics.median(series), q[0], q[2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    rows = []
    for nf, nr, d in CONFIGS:
        gen = torch.Generator().manual_seed(nf * 7 + d)
        head = nn.Linear(d, PROJ)
        f = torch.randn(nf, d, generator=gen).requires_grad_(True)
        r = torch.randn(nr, d, generator=gen)
        labels = torch.arange(nf) % max(1, nf // 4)  # concepts of 4 rows
        reps = opts.reps if nf <= 512 else max(3, opts.reps // 3)
        results = {}
        for name, fn in PATHS.items():
            head.zero_grad(set_to_none=True)
            f.grad = None
            loss = fn(head, f, r, labels)
            loss.backward()
            results[name] = (float(loss.detach()), head.weight.grad.clone())
        timings = _time_paths(head, f, r, labels, reps)
        for name, (median, q1, q3) in timings.items():
            rows.append({"nf": nf, "nr": nr, "d": d, "p": PROJ, "path": name,
                         "fwd_bwd_ms_median": round(median, 4), "fwd_bwd_ms_q1": round(q1, 4),
                         "fwd_bwd_ms_q3": round(q3, 4), "reps": reps})
        loss_diff = abs(results["fused"][0] - results["module"][0])
        grad_diff = float((results["fused"][1] - results["module"][1]).abs().max())
        for row in rows[-2:]:
            row.update(loss_abs_diff=f"{loss_diff:.3g}", head_grad_max_abs_diff=f"{grad_diff:.3g}")
        fused_ms, module_ms = rows[-2]["fwd_bwd_ms_median"], rows[-1]["fwd_bwd_ms_median"]
        print(f"Nf={nf:5d} Nr={nr:5d} D={d}: fused {fused_ms:9.3f} ms, module "
              f"{module_ms:9.3f} ms (x{module_ms / fused_ms:.2f}); loss diff {loss_diff:.2g}, "
              f"head grad diff {grad_diff:.2g}", flush=True)
    with open(os.path.join(opts.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(opts.out, "env.txt"), "w") as f:
        f.write(f"torch {torch.__version__}, threads {opts.threads}, {platform.processor() or ''}"
                f" {platform.machine()}, {os.cpu_count()} logical CPUs (shared, busy)\n")


if __name__ == "__main__":
    main()

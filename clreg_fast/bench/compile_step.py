"""A compiled training step against the same step eager, and the custom ops' per-call overhead.

``python -m clreg_fast.bench.compile_step --out DIR`` writes ``compile_step.csv``,
``op_overhead.csv`` and ``compile_step.md``:

* step: a tiny encoder (Linear, tanh) whose forward ends in ``fused_clreg_loss(..., labels=...)``,
  forward + backward + an SGD update, eager and under ``torch.compile`` (Inductor, automatic
  dynamic shapes), over a sequence of batch sizes that changes every step as token-level
  features do. Recorded: compile time (first calls), steady per-step median, the number of
  graphs compiled, and the largest loss difference to eager.
* overhead: each torch-backend primitive called directly and through
  ``torch.ops.clreg_fast.*`` on small CPU shapes, and one eager loss step with the backend
  calls routed through the ops (``route_through_ops``) or not. This is what decided that eager
  calls skip the op dispatch.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from clreg_fast import fused_clreg_loss
from clreg_fast.backends.base import route_through_ops


class TinyEncoder(torch.nn.Module):
    """Linear + tanh, then a projection head inside the loss."""

    def __init__(self, d_in: int, hidden: int, p: int, backend: str, temperature: float = 0.1):
        super().__init__()
        self.body = torch.nn.Linear(d_in, hidden)
        self.head = torch.nn.Linear(hidden, p)
        self.backend = backend
        self.temperature = temperature

    def forward(self, x_forget, x_retain, labels):
        forget = torch.tanh(self.body(x_forget))
        retain = torch.tanh(self.body(x_retain))
        return fused_clreg_loss(forget, retain, self.head.weight, self.head.bias, labels=labels,
                                temperature=self.temperature, backend=self.backend)


def _sizes(steps: int, base: int, seed: int) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    nf = torch.randint(base // 2, 2 * base, (steps,), generator=g).tolist()
    nr = torch.randint(base // 2, 2 * base, (steps,), generator=g).tolist()
    return list(zip(nf, nr))


def _batch(nf, nr, d, seed, device):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 8, (nf,), generator=g)
    labels[:2] = 0
    return (torch.randn(nf, d, generator=g).to(device), torch.randn(nr, d, generator=g).to(device),
            labels.to(device))


def _timed(fn: Callable[[], object], device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_step(backend: str = "torch", device: str = "cpu", steps: int = 30, base: int = 64,
                 d: int = 64, hidden: int = 128, p: int = 32, seed: int = 0,
                 progress: bool = False, compiler: str = "inductor") -> List[Dict[str, object]]:
    """Rows (mode eager / compiled) of the varying-size training step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = torch.device(device)
    sizes = _sizes(steps, base, seed)
    batches = [_batch(nf, nr, d, seed + i, dev) for i, (nf, nr) in enumerate(sizes)]
    rows, losses = [], {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(seed)
        model = TinyEncoder(d, hidden, p, backend).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        counter = None
        fn = model
        if mode == "compiled":
            torch._dynamo.reset()
            counter = CompileCounterWithBackend(compiler)
            fn = torch.compile(model, backend=counter, fullgraph=True)
        times, mode_losses = [], []
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"{mode} step", leave=False)
        for batch in iterator:
            def step():
                opt.zero_grad(set_to_none=True)
                loss = fn(*batch)
                loss.backward()
                opt.step()
                mode_losses.append(float(loss.detach()))
            times.append(_timed(step, dev))
        losses[mode] = mode_losses
        # Steps whose size was new to the compiler carry compile time: the first two (static,
        # then dynamic); the rest is the steady state.
        steady = times[2:]
        rows.append(dict(kind="step", backend=backend, device=device,
                         mode=mode if mode == "eager" else f"compiled ({compiler})", steps=steps,
                         nf_range=f"{min(s[0] for s in sizes)}-{max(s[0] for s in sizes)}",
                         nr_range=f"{min(s[1] for s in sizes)}-{max(s[1] for s in sizes)}",
                         d=d, hidden=hidden, p=p,
                         first_two_steps_s=round(times[0] + times[1], 3),
                         steady_median_ms=round(1e3 * statistics.median(steady), 3),
                         graphs=counter.frame_count if counter is not None else 0))
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    for row in rows:
        row["max_loss_diff_vs_eager"] = f"{diff:.2e}"
    return rows


def _median_us(fn: Callable[[], object], reps: int, rounds: int = 5) -> float:
    for _ in range(min(reps, 50)):
        fn()
    best = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(best)


def measure_overhead(reps: int = 2000, seed: int = 0) -> List[Dict[str, object]]:
    """Per-call CPU microseconds of the torch-backend primitives, direct vs custom op."""
    from clreg_fast.backends.torch_chunked import ops

    g = torch.Generator().manual_seed(seed)
    za = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    zc = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    lse = ops.lse_forward_chunked(za, zc, 0, 10.0)
    w = torch.rand(16, generator=g)
    cases = {
        "lse_forward": (lambda: ops.lse_forward_chunked(za, zc, 0, 10.0),
                        lambda: torch.ops.clreg_fast.torch_lse_forward(za, zc, 0, 10.0)),
        "lse_backward": (lambda: ops.lse_backward_chunked(za, zc, lse, w, 0, 10.0, 24, True),
                         lambda: torch.ops.clreg_fast.torch_lse_backward(za, zc, lse, w, 0, 10.0,
                                                                          24, True)),
    }
    rows = []
    for name, (direct, op) in cases.items():
        rows.append(dict(kind="op", name=name, shape="16 x 24, P=8",
                         direct_us=round(_median_us(direct, reps), 2),
                         custom_op_us=round(_median_us(op, reps), 2)))
    forget = torch.randn(16, 8, generator=g, requires_grad=True)
    retain = torch.randn(8, 8, generator=g)
    weight = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (16,), generator=g)

    def loss_step():
        fused_clreg_loss(forget, retain, weight, labels=labels, backend="torch").backward()

    direct = _median_us(loss_step, reps // 4)
    with route_through_ops():
        via_ops = _median_us(loss_step, reps // 4)
    rows.append(dict(kind="op", name="fused_clreg_loss fwd+bwd (eager)",
                     shape="Nf 16, Nr 8, D 8, P 6", direct_us=round(direct, 2),
                     custom_op_us=round(via_ops, 2)))
    return rows


def _write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _markdown(step_rows, op_rows, command: str) -> str:
    lines = [f"# torch.compile step and op overhead\n", f"Command: `{command}`\n",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n",
             "## Training step with varying Nf, Nr\n",
             "| mode | backend | device | steps | Nf | Nr | first two steps (s) | steady median "
             "(ms) | graphs | max loss diff vs eager |", "|" + "---|" * 10]
    for r in step_rows:
        lines.append(f"| {r['mode']} | {r['backend']} | {r['device']} | {r['steps']} | "
                     f"{r['nf_range']} | {r['nr_range']} | {r['first_two_steps_s']} | "
                     f"{r['steady_median_ms']} | {r['graphs']} | {r['max_loss_diff_vs_eager']} |")
    lines += ["", "## Per-call overhead (CPU, microseconds, median of 5 rounds)\n",
              "| call | shape | direct | through torch.ops.clreg_fast |", "|---|---|---|---|"]
    for r in op_rows:
        lines.append(f"| {r['name']} | {r['shape']} | {r['direct_us']} | {r['custom_op_us']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clreg_fast.bench.compile_step",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--base", type=int, default=64, help="batch sizes vary in [base/2, 2 base)")
    p.add_argument("--threads", type=int)
    p.add_argument("--reps", type=int, default=2000, help="calls per overhead round")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 4:
        p.error("--steps must be at least 4 (two compile steps, then the steady state)")
    args.out.mkdir(parents=True, exist_ok=True)
    op_rows = measure_overhead(args.reps)
    _write_csv(args.out / "op_overhead.csv", op_rows)
    step_rows = []
    if not args.skip_step:
        step_rows = measure_step(args.backend, args.device, args.steps, args.base,
                                 progress=args.progress)
        _write_csv(args.out / "compile_step.csv", step_rows)
    command = "python -m clreg_fast.bench.compile_step " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:])
    md = _markdown(step_rows, op_rows, command)
    (args.out / "compile_step.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker for tests/test_distributed.py: every case, on every rank, of one world size.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=N
tests/dist_scripts/dist_clreg_worker.py --out results.json``. Every rank builds the same global
batch (same seed), keeps its own rows, runs the distributed loss and compares against the
single-process reference on the concatenated batch under the DDP convention:

* the value equals the global loss on every rank (bitwise the same on all ranks);
* this rank's feature gradients equal ``world_size x`` the global gradient of its rows;
* projection gradients, averaged over ranks as DDP does, equal the global ones.

Rank 0 writes one JSON record per case: ``{"status": "ok" | "skipped" | "error", "checks":
{name: [max error over ranks, tolerance]}, "raised": [per-rank exception or null], ...}``; the
pytest side asserts on them. A case that raises on some rank is recorded, not fatal.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clreg_testing import local_slice, make_problem, reference_with_extra, rel_err  # noqa: E402

from clreg_fast import available_backends, fused_clreg_loss  # noqa: E402
from clreg_fast.distributed import RetainFeatureQueue  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def pick(values, world):
    """Per-rank row counts for this world size (the first ``world`` entries)."""
    return list(values[:world])


def avg_over_ranks(t, group, world):
    if t is None:
        return None
    t = t.detach().double().clone()
    dist.all_reduce(t, group=group)
    return t / world


def spread_over_ranks(value: torch.Tensor, group, world) -> float:
    """max - min of a scalar over ranks: 0 when every rank returned the same bits."""
    v = value.detach().double().reshape(1)
    parts = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(parts, v, group=group)
    stacked = torch.cat(parts)
    return float(stacked.max() - stacked.min())


def loss_case(rank, world, group, *, seed, nf, nr, d=6, p=4, bias=True, labels=True,
              dtype=torch.float64, reduction="mean", retain_grad=True, backend="torch",
              grad_out="same", extra_rows=0, empty_as_none=False, temperature=0.1):
    """One distributed loss call against the reference on the concatenated batch."""
    prob = make_problem(seed, nf, nr, d, p, dtype=dtype, bias=bias, labels=labels)
    loc = local_slice(prob, rank)
    forget = loc["forget"].requires_grad_()
    retain = loc["retain"].requires_grad_(retain_grad)
    weight = None if loc["weight"] is None else loc["weight"].requires_grad_()
    bias_t = None if loc["bias"] is None else loc["bias"].requires_grad_()
    lab = loc["labels"]
    if empty_as_none and forget.shape[0] == 0:
        lab = None
    retain_arg = None if empty_as_none and retain.shape[0] == 0 else retain

    extra = None
    if extra_rows:
        # Queue rows from an "earlier step": each rank pushes its own rows, the queue gathers.
        width = p if p is not None else d
        queue = RetainFeatureQueue(capacity=extra_rows, dim=width, process_group=group,
                                   dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        gen = torch.Generator().manual_seed(seed + 1000 + rank)
        old = torch.randn(rank + 2, d, generator=gen, dtype=torch.float64).to(dtype)
        queue.enqueue(old, loc["weight"], loc["bias"])
        extra = queue.negatives()

    out = fused_clreg_loss(forget, retain_arg, weight, bias_t, labels=lab, temperature=temperature,
                           reduction=reduction, backend=backend, extra_negatives=extra,
                           process_group=group)

    gen = torch.Generator().manual_seed(seed + 7)
    n_total = sum(nf)
    if reduction == "none":
        g_all = torch.randn(n_total, generator=gen, dtype=torch.float64)
        g_local = g_all[loc["f0"]:loc["f0"] + forget.shape[0]]
    else:
        g_ranks = [0.7] * world if grad_out == "same" else [0.5 + r for r in range(world)]
        g_local = torch.tensor(g_ranks[rank], dtype=torch.float64)
    out.backward(g_local.to(out.dtype))

    # Expected: single process, float64 reference on the global batch.
    gf = prob["forget"].double().requires_grad_()
    gr = prob["retain"].double().requires_grad_(retain_grad)
    gw = None if prob["weight"] is None else prob["weight"].double().requires_grad_()
    gb = None if prob["bias"] is None else prob["bias"].double().requires_grad_()
    glab = prob["labels"]
    ref = reference_with_extra(gf, gr, gw, gb, glab, extra, temperature, reduction)
    if reduction == "none":
        objective = (ref * g_all).sum()
        expected_value = ref[loc["f0"]:loc["f0"] + forget.shape[0]]
    else:
        objective = ref * (sum(g_ranks) / world)  # DDP averages the ranks' objectives
        expected_value = ref
    leaves = [t for t in (gf, gr, gw, gb) if t is not None and t.requires_grad]
    grads = dict(zip([id(t) for t in leaves], torch.autograd.grad(objective, leaves)))

    def expected_grad(t, lo, n):
        return None if t is None or id(t) not in grads else grads[id(t)][lo:lo + n] * world

    tol = TOL[dtype]
    checks = {
        "value": [rel_err(out.detach(), expected_value.to(out.dtype)), tol],
        "grad_forget": [rel_err(forget.grad, expected_grad(gf, loc["f0"], forget.shape[0])), tol],
    }
    if reduction != "none":
        checks["same_value_on_every_rank"] = [spread_over_ranks(out, group, world), 0.0]
    if retain_grad and retain_arg is None:  # a rank that passed retain=None has no rows
        checks["retain_none_gets_no_grad"] = [float(retain.grad is not None), 0.0]
    elif retain_grad:
        checks["grad_retain"] = [rel_err(retain.grad,
                                         expected_grad(gr, loc["r0"], retain.shape[0])), tol]
    else:
        checks["retain_has_no_grad"] = [0.0 if retain.grad is None else 1.0, 0.0]
    if weight is not None:
        checks["grad_weight_ddp_avg"] = [rel_err(avg_over_ranks(weight.grad, group, world),
                                                 grads[id(gw)]), tol]
    if bias_t is not None:
        checks["grad_bias_ddp_avg"] = [rel_err(avg_over_ranks(bias_t.grad, group, world),
                                               grads[id(gb)]), tol]
    return {"checks": checks}


def bf16_case(rank, world, group, seed=11):
    """bf16 inputs: the distributed error (vs float64) within twice the single-process one."""
    nf, nr = pick([4, 3, 5], world), pick([3, 2, 2], world)
    prob = make_problem(seed, nf, nr, 16, 8, dtype=torch.bfloat16)
    loc = local_slice(prob, rank)
    tensors = [loc[k].requires_grad_() for k in ("forget", "retain", "weight", "bias")]
    out = fused_clreg_loss(*tensors, labels=loc["labels"], backend="torch", process_group=group)
    out.backward()

    def global_run(cast, **kw):
        ts = [prob[k].to(cast).requires_grad_() for k in ("forget", "retain", "weight", "bias")]
        value = kw.pop("fn")(*ts, labels=prob["labels"])
        return value, torch.autograd.grad(value, ts)

    exact, exact_grads = global_run(torch.float64, fn=lambda *a, labels: reference_with_extra(
        *a, labels, None, 0.1, "mean"))
    single, single_grads = global_run(torch.bfloat16, fn=lambda *a, labels: fused_clreg_loss(
        *a, labels=labels, backend="torch"))
    f0, r0 = loc["f0"], loc["r0"]
    n_f, n_r = nf[rank], nr[rank]
    dist_grads = [tensors[0].grad.double() / world, tensors[1].grad.double() / world,
                  avg_over_ranks(tensors[2].grad, group, world),
                  avg_over_ranks(tensors[3].grad, group, world)]
    slices = [slice(f0, f0 + n_f), slice(r0, r0 + n_r), slice(None), slice(None)]
    checks = {"value": [rel_err(out, exact), 2 * rel_err(single, exact) + 1e-3]}
    for name, got, ex, sg, sl in zip(("forget", "retain", "weight", "bias"), dist_grads,
                                     exact_grads, single_grads, slices):
        bound = 2 * rel_err(sg[sl], ex[sl]) + 1e-3
        checks[f"grad_{name}"] = [rel_err(got, ex[sl]), bound]
    return {"checks": checks}


def ddp_case(rank, world, group, seed=21):
    """A DDP-wrapped encoder + projection head: averaged parameter grads = single process."""
    d_in, d, p = 5, 6, 4
    nf, nr = pick([3, 0, 4], world), pick([2, 3, 1], world)
    gen = torch.Generator().manual_seed(seed)
    xf = torch.randn(sum(nf), d_in, generator=gen, dtype=torch.float64)
    xr = torch.randn(sum(nr), d_in, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (sum(nf),), generator=gen)

    class Net(nn.Module):
        def __init__(self, pg):
            super().__init__()
            torch.manual_seed(seed)
            self.encoder = nn.Linear(d_in, d, dtype=torch.float64)
            self.head = nn.Linear(d, p, dtype=torch.float64)
            self.pg = pg

        def forward(self, f_in, r_in, lab, backend):
            f, r = torch.tanh(self.encoder(f_in)), torch.tanh(self.encoder(r_in))
            return fused_clreg_loss(f, r.detach(), self.head.weight, self.head.bias, labels=lab,
                                    backend=backend, process_group=self.pg)

    ddp = DistributedDataParallel(Net(group), process_group=group)
    f0, r0 = sum(nf[:rank]), sum(nr[:rank])
    loss = ddp(xf[f0:f0 + nf[rank]], xr[r0:r0 + nr[rank]], labels[f0:f0 + nf[rank]], "torch")
    loss.backward()
    single = Net(None)
    expected = single(xf, xr, labels, "reference")
    expected.backward()
    checks = {"value": [rel_err(loss.detach(), expected.detach()), 1e-9]}
    for (name, got), (_, want) in zip(ddp.module.named_parameters(), single.named_parameters()):
        checks[f"grad_{name}"] = [rel_err(got.grad, want.grad), 1e-9]
    return {"checks": checks}


def subgroup_case(rank, world, group, seed=31):
    """A process group of ranks 0 and 2 of three: group ranks, not global ranks, index rows."""
    if world < 3:
        return {"skipped": "needs 3 ranks"}
    sub = dist.new_group([0, 2])  # every rank must call new_group
    if rank == 1:
        return {"checks": {}}
    return loss_case(0 if rank == 0 else 1, 2, sub, seed=seed, nf=[3, 4], nr=[2, 2])


def stand_in_grad_case(rank, world, group, seed=41):
    """Rank 1 has no forget rows and no tensor needing a gradient: backward must not hang."""
    nf, nr = pick([4, 0, 3], world), pick([2, 3, 1], world)
    prob = make_problem(seed, nf, nr, 5, None, labels=False)
    loc = local_slice(prob, rank)
    forget = loc["forget"]
    if forget.shape[0]:
        forget.requires_grad_()
    out = fused_clreg_loss(forget, loc["retain"], backend="torch", process_group=group)
    out.backward()
    gf = prob["forget"].requires_grad_()
    ref = reference_with_extra(gf, prob["retain"], None, None, None, None, 0.1, "mean")
    (grad,) = torch.autograd.grad(ref, [gf])
    expected = grad[loc["f0"]:loc["f0"] + nf[rank]] * world
    got = forget.grad if forget.requires_grad else expected
    return {"checks": {"value": [rel_err(out.detach(), ref.detach()), 1e-9],
                       "grad_forget": [rel_err(got, expected), 1e-9]}}


def queue_case(rank, world, group, seed=51):
    """A gathering queue is the same on every rank, equals a single-process queue fed the
    concatenated rows, and round-trips through a checkpoint (position included)."""
    d, p, capacity = 5, 3, 7
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(p, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(p, generator=gen, dtype=torch.float64)
    queue = RetainFeatureQueue(capacity, p, process_group=group)
    single = RetainFeatureQueue(capacity, p)
    for step in range(3):
        counts = [(r + step) % 3 + 1 for r in range(world)]
        rows = torch.randn(sum(counts), d, generator=gen, dtype=torch.float64)
        r0 = sum(counts[:rank])
        queue.enqueue(rows[r0:r0 + counts[rank]], weight, bias)
        for r in range(world):  # the same rows, rank by rank, in one process
            lo = sum(counts[:r])
            single.enqueue(rows[lo:lo + counts[r]], weight, bias)
    buf = io.BytesIO()
    torch.save(queue.state_dict(), buf)
    buf.seek(0)
    restored = RetainFeatureQueue(capacity, p, process_group=group)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    more = torch.randn(2, d, generator=gen, dtype=torch.float64)
    for q in (queue, restored):
        q.enqueue(more, weight, bias)
    for r in range(world):
        single.enqueue(more, weight, bias)
    checks = {
        "matches_single_process": [rel_err(queue.features, single.features), 1e-6],
        "same_len": [abs(len(queue) - len(single)), 0],
        "restored_equals_original": [rel_err(restored.features, queue.features), 0.0],
        "restored_len": [abs(len(restored) - len(queue)), 0],
    }
    flat = queue.features.double().sum().reshape(1)
    checks["same_on_every_rank"] = [spread_over_ranks(flat, group, world), 0.0]
    return {"checks": checks}


def raises_case(kind):
    """Cases that must raise ValueError on every rank (instead of hanging)."""

    def run(rank, world, group):
        seed = 61
        temperature = 0.1
        nf, nr = pick([3, 2, 2], world), pick([2, 1, 1], world)
        labels, extra = True, None
        if kind == "too_few_forget_rows":
            nf = [1] + [0] * (world - 1)
        prob = make_problem(seed, nf, nr, 4, 3, labels=labels)
        loc = local_slice(prob, rank)
        forget, lab = loc["forget"], loc["labels"]
        if kind == "no_positive":
            lab = torch.arange(loc["f0"], loc["f0"] + nf[rank])  # unique over all ranks
        if kind == "bad_input_on_rank_1" and rank == 1:
            forget = torch.randn(nf[rank], 5, dtype=torch.float64)  # D = 5, not 4
        if kind == "temperature_differs":
            temperature = 0.1 + 0.05 * rank
        if kind == "labels_on_some_ranks_only" and rank == 1:
            lab = None
        if kind == "queue_bad_rows_on_rank_1":
            # A gathering queue: rank 1's rows do not fit the weight; no rank may wait forever.
            queue = RetainFeatureQueue(capacity=4, dim=3, process_group=group,
                                       dtype=torch.float64)
            rows = torch.randn(2, 5 if rank == 1 else 4, dtype=torch.float64)
            queue.enqueue(rows, loc["weight"], loc["bias"])
            return {"checks": {"did_not_raise": [1.0, 0.0]}}
        if kind == "extra_differs":
            gen = torch.Generator().manual_seed(rank)  # different rows on every rank
            extra = torch.nn.functional.normalize(
                torch.randn(3, 3, generator=gen, dtype=torch.float64), dim=1)
        if kind == "local_queue_differs":
            # The usual mistake: a queue without a process_group fills with each rank's own
            # rows, so the ranks' queues have the same length but different rows.
            queue = RetainFeatureQueue(capacity=4, dim=3, dtype=torch.float64)
            gen = torch.Generator().manual_seed(100 + rank)
            queue.enqueue(torch.randn(2, 4, generator=gen, dtype=torch.float64), loc["weight"],
                          loc["bias"])
            extra = queue.negatives()
        fused_clreg_loss(forget, loc["retain"], loc["weight"], loc["bias"], labels=lab,
                         temperature=temperature, extra_negatives=extra, backend="torch",
                         process_group=group)
        return {"checks": {"did_not_raise": [1.0, 0.0]}}

    return run


def triton_case(rank, world, group):
    if "triton" not in available_backends():
        return {"skipped": "triton backend not available in this process"}
    return loss_case(rank, world, group, seed=71, nf=pick([3, 5, 2], world),
                     nr=pick([4, 1, 3], world), d=16, p=8, dtype=torch.float32,
                     backend="triton", extra_rows=4)


CASES = {
    "proj_labels_mean": lambda r, w, g: loss_case(
        r, w, g, seed=1, nf=pick([3, 5, 2], w), nr=pick([4, 1, 3], w)),
    "zero_forget_rank_sum_retain_detached": lambda r, w, g: loss_case(
        r, w, g, seed=2, nf=pick([4, 0, 3], w), nr=pick([2, 3, 0], w), bias=False,
        reduction="sum", retain_grad=False, empty_as_none=True),
    "no_proj_no_labels": lambda r, w, g: loss_case(
        r, w, g, seed=3, nf=pick([2, 3, 4], w), nr=pick([3, 0, 2], w), p=None, labels=False,
        empty_as_none=True),
    "reduction_none": lambda r, w, g: loss_case(
        r, w, g, seed=4, nf=pick([5, 2, 3], w), nr=pick([2, 2, 1], w), reduction="none"),
    "grad_output_differs_per_rank": lambda r, w, g: loss_case(
        r, w, g, seed=5, nf=pick([3, 4, 2], w), nr=pick([1, 2, 2], w), grad_out="per_rank"),
    "float32": lambda r, w, g: loss_case(
        r, w, g, seed=6, nf=pick([6, 3, 5], w), nr=pick([4, 5, 2], w), d=12, p=8,
        dtype=torch.float32, temperature=0.07),
    "extra_negatives_from_queue": lambda r, w, g: loss_case(
        r, w, g, seed=7, nf=pick([3, 2, 4], w), nr=pick([2, 3, 1], w), extra_rows=5),
    "extra_negatives_no_proj_none": lambda r, w, g: loss_case(
        r, w, g, seed=8, nf=pick([3, 0, 4], w), nr=pick([2, 3, 1], w), p=None,
        reduction="none", extra_rows=6),
    "reference_backend_mean": lambda r, w, g: loss_case(
        r, w, g, seed=9, nf=pick([3, 0, 2], w), nr=pick([4, 1, 3], w), backend="reference",
        retain_grad=False),
    "reference_backend_none": lambda r, w, g: loss_case(
        r, w, g, seed=10, nf=pick([2, 4, 3], w), nr=pick([1, 2, 0], w), backend="reference",
        reduction="none"),
    "bf16": bf16_case,
    "ddp_end_to_end": ddp_case,
    "subgroup_of_world": subgroup_case,
    "rank_without_grad_inputs": stand_in_grad_case,
    "queue_gather_and_checkpoint": queue_case,
    "triton_interpreter": triton_case,
}
RAISING = ("too_few_forget_rows", "no_positive", "bad_input_on_rank_1", "temperature_differs",
           "labels_on_some_ranks_only", "extra_differs", "local_queue_differs",
           "queue_bad_rows_on_rank_1")
for _kind in RAISING:
    CASES[f"raises_{_kind}"] = raises_case(_kind)


def _over(err, tol):
    """How far an error is past its tolerance (> 0 fails), comparable across ranks."""
    return err - tol if tol == 0 else err / tol - 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    results = {}
    for name in names:
        try:
            record = CASES[name](rank, world, group)
            record.setdefault("status", "skipped" if "skipped" in record else "ok")
            record["raised"] = None
        except Exception as exc:  # recorded for the pytest side, which asserts on it
            record = {"status": "raised", "raised": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
        gathered = [None] * world
        dist.all_gather_object(gathered, record, group=group)
        if rank == 0:
            merged = {"status": [r["status"] for r in gathered],
                      "raised": [r["raised"] for r in gathered],
                      "traceback": [r.get("traceback") for r in gathered],
                      "skipped": next((r["skipped"] for r in gathered if "skipped" in r), None),
                      "checks": {}}
            # Per check, the rank that is worst relative to its own tolerance.
            for r in gathered:
                for key, (err, tol) in r.get("checks", {}).items():
                    old = merged["checks"].get(key)
                    if old is None or _over(err, tol) > _over(*old):
                        merged["checks"][key] = [err, tol]
            results[name] = merged
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    dist.barrier()
    # Leave together: a rank that tears gloo down while a peer still finishes the last
    # collective makes that peer abort, so the ranks first meet in the (TCP) rendezvous store.
    store = dist.distributed_c10d._get_default_store()
    store.add("clreg_worker_done", 1)
    while store.add("clreg_worker_done", 0) < world:
        time.sleep(0.01)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""CLReg under sharding engines, 2 gloo ranks on CPU, compared with one process.

``torchrun --nproc_per_node=2 tests/dist_scripts/engine_worker.py --engine E --out r.pt
--output-dir d`` with E one of:

* ``zero3`` / ``zero2`` (DeepSpeed turned on through accelerate's environment, set by the
  caller): ``CLRegMixin`` cases on a real ``transformers.Trainer`` (one optimizer step each);
  ``zero3`` also trains a module owning a ``CLRegLoss`` projection with ``deepspeed.initialize``
  and hands ``fused_clreg_loss`` a ZeRO-3 partitioned weight;
* ``fsdp2``: ``CLRegLoss`` with its projection under ``fully_shard`` (one unit, and the
  projection a unit of its own), ``fused_clreg_loss`` handed the DTensor weight, and the
  mixin's capture and term with its head in the root unit of a ``fully_shard``-ed tiny LLaMA
  (the Trainer's FSDP needs GPUs: accelerate turns it on only on accelerator devices).

Every case is compared on rank 0 with one process's plain-autograd computation on the same rows
(``capture_layer`` + ``pool_features`` + ``clreg_loss_reference``). Rank 0 writes a dict
``case -> {error, scale, ...}``; a case that raises writes its message instead, so one failure
does not hide the others.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

LAYER = 1
LR = 0.05
WEIGHT = 0.5


# ----------------------------------------------------------------------------- the mixin

def _recording(cls, concepts_by_rank=None):
    """``cls`` keeping its first micro-batch (concept ids included), optionally with concept
    ids chosen per rank (to drop the term on some ranks only)."""

    class Recording(cls):
        def clreg_concept_ids(self, forget):
            ids = super().clreg_concept_ids(forget)
            if concepts_by_rank is not None:
                ids = torch.tensor(concepts_by_rank[dist.get_rank()])
            self.first_batches.append({"concept_ids": None if ids is None else ids.clone()})
            return ids

        def compute_loss(self, model, inputs, *args, **kwargs):
            terms_before = self._clreg_log_count  # counts the terms added since the last log
            result = super().compute_loss(model, inputs, *args, **kwargs)
            self.first_batches[-1].update(
                {side: {k: v.clone() for k, v in inputs[side].items() if k != "concept_ids"}
                 for side in ("forget", "retain")})
            self.first_batches[-1]["dropped"] = self._clreg_log_count == terms_before
            return result

    return Recording


def _full_params(module: nn.Module, zero3: bool):
    named = list(module.named_parameters())
    if not zero3:  # FSDP2 holds DTensors: their full value
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def _expected(model0, head0, batches, negatives, fallback="skip"):
    """One process: the SGD update and loss of the mean over the ranks' micro-batches of
    SeqMeanGradDiff + WEIGHT * CLReg (per micro-batch, or over all rows for "global")."""
    import hf_testing as H
    from clreg_fast.reference import clreg_loss_reference
    from clreg_fast.unlearn.data import answer_mask
    from clreg_fast.unlearn.features import capture_layer, pool_features

    model = copy.deepcopy(model0).train()
    head = copy.deepcopy(head0) if head0 is not None else None
    w, b = (head.weight, head.bias) if head is not None else (None, None)
    total, rows = 0.0, {"f": [], "l": [], "r": []}
    for batch in batches:
        f, r = batch["forget"], batch["retain"]
        with capture_layer(model, LAYER) as cap:
            f_logits = cap.run(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
            f_hidden = cap[LAYER]
        with capture_layer(model, LAYER) as cap:
            r_logits = cap.run(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
            r_hidden = cap[LAYER]
        base = (-H.sequence_mean_nll(f_logits, f["labels"])
                + H.sequence_mean_nll(r_logits, r["labels"]))
        f_feats, f_labels = pool_features(f_hidden, answer_mask(f["labels"]), "mean",
                                          batch["concept_ids"])
        r_feats, _ = pool_features(r_hidden.detach(), answer_mask(r["labels"]), "mean")
        if negatives == "global":
            rows["f"].append(f_feats), rows["l"].append(f_labels), rows["r"].append(r_feats)
        elif not batch["dropped"]:
            base = base + WEIGHT * clreg_loss_reference(f_feats.float(), r_feats.float(), w, b,
                                                        labels=f_labels)
        total = total + base / len(batches)
    if negatives == "global":
        total = total + WEIGHT * clreg_loss_reference(
            torch.cat(rows["f"]).float(), torch.cat(rows["r"]).float(), w, b,
            labels=torch.cat(rows["l"]))
    total.backward()
    out = {n: p.detach() - LR * p.grad for n, p in model.named_parameters()}
    if head is not None:
        out.update({f"clreg_head.{n}": p.detach() - LR * p.grad
                    for n, p in head.named_parameters()})
    return out, float(total.detach())


def mixin_case(name, output_dir, zero3, proj_dim, negatives="local", concepts_by_rank=None,
               rows_per_rank=4, **extra_args):
    import hf_testing as H

    model = H.tiny_model()
    model0 = copy.deepcopy(model)
    # use_cpu=False: DeepSpeed (turned on by the environment) then sets up the ranks itself
    extra_args = {"use_cpu": False, **extra_args}
    # ddp_timeout: a desynchronized collective fails in minutes instead of hanging for 30
    args = H.training_args(os.path.join(output_dir, name), max_steps=1, ddp_backend="gloo",
                           learning_rate=LR, per_device_train_batch_size=rows_per_rank,
                           ddp_timeout=180, **extra_args)
    cls = _recording(H.CLRegSeqMeanGradDiff, concepts_by_rank)
    world = dist.get_world_size()
    trainer = cls(model=model, args=args,
                  train_dataset=H.make_pairs(rows_per_rank * world, seed=1),
                  data_collator=H.collate_pairs, clreg_proj_dim=proj_dim, clreg_layer=LAYER,
                  clreg_weight=WEIGHT, clreg_negatives=negatives, clreg_fallback="skip")
    trainer.first_batches = []
    head0 = copy.deepcopy(trainer.clreg_head)  # before the engine partitions it
    head_dtype = None if head0 is None else str(head0.weight.dtype)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    from clreg_fast.integrations.hf import _fsdp_version

    sharded = {"fsdp_version": _fsdp_version(trainer),
               "dtensor_params": sum(hasattr(p, "full_tensor")
                                     for p in trainer.model.parameters()),
               "zero3_params": sum(hasattr(p, "ds_id") for p in trainer.model.parameters())}
    after = _full_params(trainer.model, zero3)
    gathered = [None] * world
    dist.all_gather_object(gathered, trainer.first_batches)
    if dist.get_rank() != 0:
        return None
    batches = [b for rank_batches in gathered for b in rank_batches]
    expected, loss = _expected(model0, head0, batches, negatives)
    # One process on the ranks' rows as one micro-batch (the same global batch on one GPU).
    one_process, _ = _expected(model0, head0, batches, "global")
    logged = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "error_vs_one_process_global_batch": max(float((after[n] - one_process[n]).abs().max())
                                                 for n in one_process),
        "error": max(float((after[n] - expected[n]).abs().max()) for n in expected),
        "scale": max(float((expected[n] - before[n]).abs().max()) for n in expected),
        "same_names": set(after) == set(expected),
        "logged_loss": logged[0]["loss"] if logged else None,
        "logged_clreg": logged[0].get("clreg_loss") if logged else None,
        "expected_loss": loss,
        "dropped": [b["dropped"] for b in batches],
        "head_dtype": head_dtype,
        **sharded,
    }


# ----------------------------------------------------------------------------- CLRegLoss

class _Net(nn.Module):
    """An encoder and a loss that owns its projection, as a model would hold them."""

    def __init__(self):
        super().__init__()
        from clreg_fast.modules import CLRegLoss

        self.encoder = nn.Linear(6, 10)
        self.loss = CLRegLoss(10, 4, temperature=0.3, backend="torch")

    def forward(self, forget, retain, labels):
        return self.loss(self.encoder(forget), self.encoder(retain).detach(), labels=labels)


def _rows(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(5, 6, generator=gen), torch.randn(3, 6, generator=gen),
            torch.tensor([0, 0, 1, 1, rank]))


def _expected_net(net0, world):
    """One process: per-rank losses and the SGD update of their mean (what DDP/ZeRO/FSDP
    average), plus each rank's forget-row gradient."""
    net = copy.deepcopy(net0)
    losses, input_grads = [], []
    total = 0.0
    for rank in range(world):
        f, r, labels = _rows(rank)
        f.requires_grad_(True)
        loss = net(f, r, labels)
        (g,) = torch.autograd.grad(loss, f, retain_graph=True)
        input_grads.append(g)
        losses.append(float(loss.detach()))
        total = total + loss / world
    total.backward()
    return ({n: p.detach() - LR * p.grad for n, p in net.named_parameters()},
            {n: p.grad.detach().clone() for n, p in net.named_parameters()}, losses, input_grads)


def clreg_loss_zero3():
    import deepspeed

    from clreg_fast import fused_clreg_loss

    torch.manual_seed(0)
    net = _Net()
    net0 = copy.deepcopy(net)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(),
                                                                           lr=LR),
                                      config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    f, r, labels = _rows(rank)
    # The fused loss handed the partitioned weight directly: a clear error, not a number.
    try:
        fused_clreg_loss(torch.randn(4, 10), None, net.loss.projection.weight)
        shard_error = "no error"
    except TypeError as exc:
        shard_error = str(exc)
    loss = engine(f, r, labels)
    engine.backward(loss)
    engine.step()
    after = _full_params(net, zero3=True)
    losses = [None] * world
    dist.all_gather_object(losses, float(loss.detach()))
    if rank != 0:
        return None
    expected, _grads, expected_losses, _ = _expected_net(net0, world)
    return {"error": max(float((after[n] - expected[n]).abs().max()) for n in expected),
            "scale": max(float((expected[n] - p.detach()).abs().max())
                         for n, p in net0.named_parameters()),
            "loss_error": max(abs(a - b) for a, b in zip(losses, expected_losses)),
            "shard_error": shard_error}


def clreg_loss_fsdp2(own_unit: bool):
    from torch.distributed.fsdp import fully_shard

    from clreg_fast import fused_clreg_loss

    torch.manual_seed(0)
    net = _Net()
    net0 = copy.deepcopy(net)
    if own_unit:
        fully_shard(net.loss.projection)  # per-module wrapping (torchtitan style)
    fully_shard(net)
    rank, world = dist.get_rank(), dist.get_world_size()
    f, r, labels = _rows(rank)
    f.requires_grad_(True)
    loss = net(f, r, labels)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in net.named_parameters()}
    try:
        fused_clreg_loss(torch.randn(4, 10), None, net.loss.projection.weight)
        shard_error = "no error"
    except TypeError as exc:
        shard_error = str(exc)
    losses = [None] * world
    dist.all_gather_object(losses, float(loss.detach()))
    input_grads = [None] * world
    dist.all_gather_object(input_grads, f.grad.detach())
    if rank != 0:
        return None
    _, expected_grads, expected_losses, expected_input = _expected_net(net0, world)
    return {"error": max(float((grads[n] - expected_grads[n]).abs().max())
                         for n in expected_grads),
            "scale": max(float(g.abs().max()) for g in expected_grads.values()),
            "input_error": max(float((a - b).abs().max())
                               for a, b in zip(input_grads, expected_input)),
            "loss_error": max(abs(a - b) for a, b in zip(losses, expected_losses)),
            "shard_error": shard_error}


def _mixin_step(model, mixin, batch):
    """One micro-batch as CLRegMixin.compute_loss computes it (its capture and its term) on a
    SeqMeanGradDiff-like loss."""
    import hf_testing as H
    from clreg_fast.integrations.hf import _ForwardCapture

    f, r = batch["forget"], batch["retain"]
    with _ForwardCapture(model, LAYER, {"forget": f["input_ids"],
                                        "retain": r["input_ids"]}) as capture:
        f_logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
        r_logits = model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    base = -H.sequence_mean_nll(f_logits, f["labels"]) + H.sequence_mean_nll(r_logits,
                                                                             r["labels"])
    term = mixin._clreg_term(capture.hidden["forget"], f, f["concept_ids"],
                             capture.hidden["retain"], r)
    return base + WEIGHT * term


def mixin_head_fsdp2():
    """The mixin's head under FSDP2 as accelerate shards a model (each decoder layer a unit, the
    root unit holding the rest, the head included), called after the model's forwards.
    (accelerate turns FSDP on only on accelerator devices, so the Trainer path needs GPUs.)"""
    from torch.distributed.fsdp import fully_shard

    import hf_testing as H

    model = H.tiny_model().train()
    mixin = object.__new__(H.CLRegSeqMeanGradDiff)  # its CLReg methods, without a Trainer
    mixin.__dict__.update(model=model, clreg_proj_dim=8, clreg_pooling="mean",
                          clreg_temperature=0.1, clreg_fallback="skip", clreg_backend="auto",
                          clreg_negatives="local", _clreg_head_anchor=None)
    mixin._add_head(model)
    model0 = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [H.collate_pairs(H.make_pairs(4, seed=10 + i)) for i in range(world)]
    _mixin_step(model, mixin, batches[rank]).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank != 0:
        return None
    reference = object.__new__(H.CLRegSeqMeanGradDiff)
    reference.__dict__.update(mixin.__dict__, model=model0)
    total = sum(_mixin_step(model0, reference, b) for b in batches) / world
    total.backward()
    expected = {n: p.grad for n, p in model0.named_parameters()}
    return {"error": max(float((grads[n] - expected[n]).abs().max()) for n in expected),
            "scale": max(float(g.abs().max()) for g in expected.values()),
            "head_scale": float(expected["clreg_head.weight"].abs().max()),
            "same_names": set(grads) == set(expected)}


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=["zero3", "zero2", "fsdp2"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    if opts.engine == "fsdp2":
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
        cases = {"clreg_loss_one_unit": lambda: clreg_loss_fsdp2(own_unit=False),
                 "clreg_loss_own_unit": lambda: clreg_loss_fsdp2(own_unit=True),
                 "mixin_head": mixin_head_fsdp2}
    else:
        zero3 = opts.engine == "zero3"
        out = opts.output_dir
        cases = {"head": lambda: mixin_case("head", out, zero3, proj_dim=8)}
        if zero3:
            cases["no_head"] = lambda: mixin_case("no_head", out, zero3, proj_dim=None)
            # rank 1's rows are of four concepts: "skip" drops its term, rank 0 keeps its own
            cases["head_dropped_on_rank_1"] = lambda: mixin_case(
                "dropped", out, zero3, proj_dim=8, concepts_by_rank=[[0, 0, 1, 1], [0, 1, 2, 3]])
            cases["clreg_loss"] = clreg_loss_zero3
        else:
            # global negatives: the run of 2 ranks x 4 rows is the run of 1 process x 8 rows
            cases["head_global"] = lambda: mixin_case("global", out, zero3, proj_dim=8,
                                                      negatives="global")
            cases["head_local"] = cases.pop("head")
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:  # noqa: BLE001 - reported per case; the test fails on it
            results[name] = {"exception": traceback.format_exc()[-4000:]}
            dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, opts.out)
    from clreg_testing import leave_together

    leave_together("engine_worker_done")


if __name__ == "__main__":
    main()

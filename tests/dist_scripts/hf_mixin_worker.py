"""CLRegMixin + NPO-like trainer under torchrun DDP with gloo on CPU.

``torchrun --nproc_per_node=2 tests/dist_scripts/hf_mixin_worker.py --out r.pt --output-dir d``
trains a few steps with a projection head; rank 0 writes the log history, whether every rank
ends with the same parameters (head included), whether head and model moved, the number of
forwards of the trained model on each rank, and how far the first DDP update is from one
process's SGD update on the mean loss of the ranks' micro-batches (computed with plain
autograd, capture_layer and clreg_loss_reference).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import copy  # noqa: E402

from transformers import TrainerCallback  # noqa: E402

import hf_testing as H  # noqa: E402
from clreg_testing import leave_together  # noqa: E402
from clreg_fast.reference import clreg_loss_reference  # noqa: E402
from clreg_fast.unlearn.data import answer_mask  # noqa: E402
from clreg_fast.unlearn.features import capture_layer, pool_features  # noqa: E402
from clreg_fast.unlearn.methods import npo_loss, sequence_nll  # noqa: E402

STEPS = 3
LAYER = 1
LR = 0.05


class RecordingCLRegNPO(H.CLRegNPO):
    """Keeps the micro-batches of the first optimizer step."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.state.global_step == 0:
            self.first_batches.append({side: {k: v.clone() for k, v in inputs[side].items()}
                                       for side in ("forget", "retain")})
        return super().compute_loss(model, inputs, *args, **kwargs)


class SnapshotAfterFirstStep(TrainerCallback):
    def __init__(self):
        self.params = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_first_update(model0, ref, head0, batches, beta, weight):
    """One process, plain autograd: SGD on the mean over the ranks' micro-batches of
    NPO(forget) + NLL(retain) + weight * CLReg (capture_layer + clreg_loss_reference)."""
    model, head = copy.deepcopy(model0).train(), copy.deepcopy(head0)
    total = 0.0
    for batch in batches:
        f, r = batch["forget"], batch["retain"]
        with capture_layer(model, LAYER) as cap:
            logits = cap.run(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
            f_hidden = cap[LAYER]
        nll, _ = sequence_nll(logits, f["labels"])
        with torch.no_grad():
            ref_nll, _ = sequence_nll(ref(input_ids=f["input_ids"],
                                          attention_mask=f["attention_mask"]).logits, f["labels"])
        with capture_layer(model, LAYER) as cap:
            retain_out = cap.run(input_ids=r["input_ids"], attention_mask=r["attention_mask"],
                                 labels=r["labels"])
            r_hidden = cap[LAYER]
        f_feats, f_labels = pool_features(f_hidden, answer_mask(f["labels"]), "mean",
                                          f["concept_ids"])
        r_feats, _ = pool_features(r_hidden.detach(), answer_mask(r["labels"]), "mean")
        clreg = clreg_loss_reference(f_feats.float(), r_feats.float(), head.weight, head.bias,
                                     labels=f_labels)
        loss = npo_loss(nll, ref_nll, beta) + retain_out.loss + weight * clreg
        total = total + loss / len(batches)
    total.backward()
    out = {n: p.detach() - LR * p.grad for n, p in model.named_parameters()}
    out.update({f"clreg_head.{n}": p.detach() - LR * p.grad for n, p in head.named_parameters()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)

    model = H.tiny_model()
    args = H.training_args(opts.output_dir, max_steps=STEPS, ddp_backend="gloo",
                           learning_rate=LR, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1)
    snapshot = SnapshotAfterFirstStep()
    trainer = RecordingCLRegNPO(model=model, args=args, train_dataset=H.make_pairs(32, seed=1),
                                data_collator=H.collate_pairs, clreg_proj_dim=8,
                                clreg_layer=LAYER, clreg_weight=0.5, callbacks=[snapshot])
    trainer.first_batches = []
    head_module0 = copy.deepcopy(trainer.clreg_head)
    model_module0 = copy.deepcopy(trainer.model)
    del model_module0.clreg_head
    ref0 = copy.deepcopy(trainer.ref_model)
    head0 = trainer.clreg_head.weight.detach().clone()
    model0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    forwards = [0]
    handle = trainer.model.register_forward_pre_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    trainer.train()
    handle.remove()

    world = dist.get_world_size()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([forwards[0]]))
    batches = [None] * world
    dist.all_gather_object(batches, trainer.first_batches)
    if dist.get_rank() == 0:
        expected = expected_first_update(model_module0, ref0, head_module0,
                                         [b for rank_batches in batches for b in rank_batches],
                                         trainer.beta, trainer.clreg_weight)
        first_step_error = max(float((snapshot.params[n] - expected[n]).abs().max())
                               for n in expected)
        first_step_scale = max(float((expected[n] - model0[n]).abs().max()) for n in expected)
        moved = any(not torch.equal(p.detach(), model0[n])
                    for n, p in trainer.model.named_parameters() if not n.startswith("clreg_head"))
        torch.save({
            "world_size": world,
            "steps": STEPS,
            "log_history": trainer.state.log_history,
            "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
            "head_moved": not torch.equal(trainer.clreg_head.weight.detach(), head0),
            "model_moved": moved,
            "forwards_per_rank": [int(c) for c in counts],
            "micro_batches_first_step": sum(len(b) for b in batches),
            "first_step_error": first_step_error,
            "first_step_scale": first_step_scale,
        }, opts.out)
    leave_together("hf_mixin_worker_done")


if __name__ == "__main__":
    main()

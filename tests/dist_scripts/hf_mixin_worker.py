"""CLRegMixin + NPO-like trainer under torchrun DDP with gloo on CPU.

``torchrun --nproc_per_node=2 tests/dist_scripts/hf_mixin_worker.py --out r.pt --output-dir d``
trains a few steps with a projection head; rank 0 writes the log history, whether every rank
ends with the same parameters (head included), whether head and model moved, and the number
of forwards of the trained model on each rank.
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

import hf_testing as H  # noqa: E402

STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)

    model = H.tiny_model()
    args = H.training_args(opts.output_dir, max_steps=STEPS, ddp_backend="gloo",
                           learning_rate=0.05, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1)
    trainer = H.CLRegNPO(model=model, args=args, train_dataset=H.make_pairs(32, seed=1),
                         data_collator=H.collate_pairs, clreg_proj_dim=8, clreg_layer=1)
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
    if dist.get_rank() == 0:
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
        }, opts.out)
    dist.barrier()


if __name__ == "__main__":
    main()

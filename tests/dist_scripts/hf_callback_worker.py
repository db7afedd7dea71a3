"""RepresentationMetricsCallback under torchrun DDP with gloo on CPU.

``torchrun --nproc_per_node=2 tests/dist_scripts/hf_callback_worker.py --out r.pt --output-dir d``
trains a few steps of the CLReg GradDiff-like trainer with the callback attached; rank 0 writes
every rank's logged representation metrics and, per rank, the metrics of the final model
computed directly (callback.compute on the unwrapped model after training).
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
from clreg_testing import leave_together  # noqa: E402
from clreg_fast.integrations.hf_callback import RepresentationMetricsCallback  # noqa: E402

STEPS = 2
LAYER = 1


def probe(n, seed, concept):
    gen = torch.Generator().manual_seed(seed)
    return [H._example(gen, concept) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)

    args = H.training_args(opts.output_dir, max_steps=STEPS, ddp_backend="gloo",
                           learning_rate=0.05, logging_steps=1)
    trainer = H.CLRegGradDiff(model=H.tiny_model(), args=args,
                              train_dataset=H.make_pairs(32, seed=1),
                              data_collator=H.collate_pairs, clreg_layer=LAYER)
    callback = RepresentationMetricsCallback(probe(5, 2, 1), probe(7, 3, 0), layer=LAYER, k=3,
                                             metrics=("entanglement_score", "knn_mixing",
                                                      "retain_drift")).attach(trainer)
    trainer.train()
    logged = [{k: v for k, v in e.items() if k.startswith("repr/") or k == "step"}
              for e in trainer.state.log_history if "repr/knn_mixing" in e]
    final = callback.compute(trainer.model)
    world = dist.get_world_size()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"logged": logged, "final": final,
                                      "wrapped": type(trainer.model_wrapped).__name__})
    if dist.get_rank() == 0:
        torch.save({"world_size": world, "ranks": per_rank}, opts.out)
    dist.barrier()
    leave_together("hf_callback_worker_done")


if __name__ == "__main__":
    main()

"""Scenarios for the distributed tests of ``clreg_fast.unlearn.train``.

Run under ``torchrun --nproc_per_node=2 tests/dist_scripts/unlearn_worker.py --parallel ddp
--out results.pt``; rank 0 writes, per scenario, the full parameters after the run and the
history. The tests import this file to compute the single-process baselines in-process.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clreg_fast.unlearn.data import collate  # noqa: E402
from clreg_fast.unlearn.methods import sequence_nll  # noqa: E402
from clreg_fast.unlearn.train import IndexStream, UnlearnConfig, unlearn  # noqa: E402

VOCAB = 64

# name -> (config overrides, steps). Distributed runs use grad_accum from the overrides; the
# single-process baseline uses world_size times as many accumulation steps (same micro-batches),
# except for clreg_negatives="global" scenarios, whose baseline is one process with the same
# grad_accum: the whole step's batch in one micro-batch when grad_accum is 1. An overrides key
# "data" names the forget set (default FORGET).
SCENARIOS = {
    # Plain GradDiff with SGD and no clipping: the update is -lr * gradient, so the parameters
    # alone check the gradient's scale.
    "graddiff_sgd": (dict(method="graddiff", optimizer="sgd", lr=0.5, max_grad_norm=None), 1),
    # NPO + CLReg with a projection head (mean pooling), SGD, a fresh deep-copied reference.
    "npo_clreg_head": (dict(method="npo", optimizer="sgd", lr=0.05, clreg_weight=0.5,
                            clreg_proj_dim=8, clreg_pooling="mean", max_grad_norm=None), 1),
    # RMU (frozen layers, early-stopped forwards) + token-level CLReg on reference features.
    "rmu_token_clreg": (dict(method="rmu", rmu_layer=2, rmu_steering=4.0, lr=1e-3,
                             clreg_weight=0.3, clreg_layer=1, clreg_pooling="token",
                             clreg_retain_source="ref"), 1),
    # Gradient accumulation on every rank (no_sync / set_requires_gradient_sync), GradAscent
    # with a features-only retain forward for CLReg, warm-up and clipping.
    "gradascent_accum": (dict(method="gradascent", optimizer="sgd", lr=0.5, grad_accum=2,
                              batch_size=8, clreg_weight=0.5, clreg_pooling="last",
                              max_grad_norm=0.5), 1),
    # Two AdamW steps of SimNPO (no reference model) with an eval_fn after every step.
    "simnpo_two_steps_eval": (dict(method="simnpo", lr=1e-3, eval_every=1), 2),
    # "npo_clreg_head" with cross-rank CLReg: the update of one process on all 4 forget rows
    # (the test also checks that the "local" run above does not make it).
    "npo_clreg_head_global": (dict(method="npo", optimizer="sgd", lr=0.05, clreg_weight=0.5,
                                   clreg_proj_dim=8, clreg_pooling="mean", max_grad_norm=None,
                                   clreg_negatives="global"), 1),
    # Global CLReg with accumulation (each accumulation step is one contrastive batch), one row
    # per answer token labelled by sequence (global sequence ids), and a retain feature queue
    # gathered over ranks (the second step's negatives include the first step's retain rows).
    "global_queue_token_accum": (dict(method="graddiff", lr=1e-3, grad_accum=2, batch_size=8,
                                      clreg_weight=0.5, clreg_pooling="token",
                                      clreg_label_by="sequence", clreg_queue_size=24,
                                      clreg_negatives="global"), 2),
    # Rank 1's forget rows have no positive (their concepts occur once in the whole batch): its
    # rows are negatives of rank 0's anchors only; with fallback "skip" a local decision would
    # drop the term on rank 1 alone.
    "global_rank_without_positive": (dict(method="graddiff", optimizer="sgd", lr=0.5,
                                          clreg_weight=1.0, clreg_proj_dim=8,
                                          clreg_fallback="skip", max_grad_norm=None,
                                          clreg_negatives="global", data="skewed"), 1),
}


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def make_examples(n: int, seed: int, concepts: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        answer = int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                    "concept_id": i % concepts})
    return out


FORGET = make_examples(8, 1, 3)


def _skewed_forget(seed: int = 3, ranks: int = 2, per_rank: int = 2):
    """FORGET relabelled so that, in the first step of a run seeded ``seed`` (``ranks`` ranks,
    ``per_rank`` forget rows each), rank 0's rows share concept 0 and every other row of the
    step has a concept of its own."""
    first = IndexStream(len(FORGET), seed, salt=1).take(ranks * per_rank)
    concept = {i: 0 for i in first[:per_rank]}
    concept.update({i: 1 + k for k, i in enumerate(first[per_rank:])})
    unused = iter(range(len(concept), len(FORGET) + len(concept)))
    return [dict(ex, concept_id=concept[i] if i in concept else next(unused))
            for i, ex in enumerate(FORGET)]


DATA = {"default": FORGET, "skewed": _skewed_forget()}
RETAIN = make_examples(16, 2, 5)
EVAL_BATCH = collate(make_examples(4, 3, 2), pad_id=0)


def eval_nll(model):
    """A forward of the bare model on a fixed batch (under FSDP every rank runs it)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in EVAL_BATCH.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, n = sequence_nll(logits, batch["labels"])
    return {"nll": float(nll.sum() / n.sum())}


def full_params(model):
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().cpu().clone()
    return out


def run_scenario(name: str, parallel: str, world: int, **extra):
    overrides, steps = SCENARIOS[name]
    kwargs = dict(batch_size=4, max_steps=steps, progress=False, seed=3)
    kwargs.update(overrides)
    forget = DATA[kwargs.pop("data", "default")]
    if parallel == "none" and kwargs.get("clreg_negatives") != "global":
        kwargs["grad_accum"] = kwargs.get("grad_accum", 1) * world
    kwargs.update(extra)
    model = tiny_model()
    eval_fn = eval_nll if kwargs.get("eval_every") else None
    history = unlearn(model, forget, RETAIN, UnlearnConfig(parallel=parallel, **kwargs),
                      pad_id=0, eval_fn=eval_fn)
    return {"params": full_params(model), "history": history}


def run_resume(parallel: str, workdir: str, negatives: str = "local"):
    """Three NPO+CLReg AdamW steps straight through, and two steps + resume from step 2; with a
    retain feature queue (one per rank for "local", one shared for "global")."""
    kwargs = dict(method="npo", batch_size=4, lr=1e-3, clreg_weight=0.5, clreg_proj_dim=8,
                  warmup_steps=2, lr_schedule="linear", progress=False, seed=5, parallel=parallel,
                  clreg_queue_size=6, clreg_negatives=negatives)
    straight = tiny_model()
    h_straight = unlearn(straight, FORGET, RETAIN,
                         UnlearnConfig(max_steps=3, out_dir=os.path.join(workdir, "a"),
                                       save_every=2, **kwargs), pad_id=0)
    resumed = tiny_model()
    h_resumed = unlearn(resumed, FORGET, RETAIN,
                        UnlearnConfig(max_steps=3, out_dir=os.path.join(workdir, "b"),
                                      resume=os.path.join(workdir, "a", "checkpoint-2"), **kwargs),
                        pad_id=0)
    return {"straight": full_params(straight), "resumed": full_params(resumed),
            "h_straight": h_straight, "h_resumed": h_resumed}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--resume-dir", default=None)
    args = parser.parse_args()
    # Initialized here, so the process group outlives unlearn() for full_tensor() gathers.
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    results = {}
    for name in [s for s in args.scenarios.split(",") if s]:
        results[name] = run_scenario(name, args.parallel, world)
    if args.resume_dir:
        results["resume"] = run_resume(args.parallel, os.path.join(args.resume_dir, "local"))
        results["resume_global"] = run_resume(args.parallel,
                                              os.path.join(args.resume_dir, "global"), "global")
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

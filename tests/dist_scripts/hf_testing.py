"""Test trainers that follow the OpenUnlearning method contract, and their data.

Written here from the contract alone (a ``transformers.Trainer`` subclass whose
``compute_loss(model, inputs, return_outputs=False)`` gets ``inputs["forget"]`` and
``inputs["retain"]`` and runs its own forwards); used by ``tests/test_hf_mixin.py`` and by the
torchrun worker ``hf_mixin_worker.py``.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
from transformers import Trainer, TrainingArguments

from clreg_fast.integrations.hf import CLRegMixin
from clreg_fast.unlearn.data import collate
from clreg_fast.unlearn.methods import npo_loss, sequence_nll
from clreg_fast.unlearn.tiny_model import make_tiny_llama

VOCAB = 48
N_LAYERS = 3


def tiny_model(seed: int = 0):
    return make_tiny_llama(VOCAB, seed=seed, hidden_size=32, num_layers=N_LAYERS, num_heads=4,
                           intermediate_size=48)


def _example(gen: torch.Generator, concept: int) -> Dict:
    prompt_len = int(torch.randint(2, 5, (1,), generator=gen))
    answer_len = int(torch.randint(2, 6, (1,), generator=gen))
    ids = torch.randint(3, VOCAB, (prompt_len + answer_len,), generator=gen).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:],
            "concept_id": concept}


def make_pairs(n: int, seed: int = 0, concepts: int = 2) -> List[Dict]:
    """``n`` items ``{"forget": example, "retain": example}`` of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [{"forget": _example(gen, i % concepts), "retain": _example(gen, 0)}
            for i in range(n)]


def collate_pairs(items: List[Dict]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Right-padded forget and retain batches; forget keeps ``concept_ids``."""
    forget = collate([it["forget"] for it in items], pad_id=0)
    retain = collate([it["retain"] for it in items], pad_id=0)
    retain.pop("concept_ids")
    return {"forget": forget, "retain": retain}


def training_args(out_dir, **overrides) -> TrainingArguments:
    """Plain SGD, constant lr, no clipping, no decay: an update is ``-lr * gradient``."""
    kwargs = dict(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=1,
                  learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _keep(batch: Dict) -> Dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


class GradDiffLike(Trainer):
    """``-gamma NLL(forget) + alpha NLL(retain)``; the transformers 4.45 ``compute_loss``
    signature (no ``num_items_in_batch``), as OpenUnlearning's GradDiff has."""

    def __init__(self, *args, gamma: float = 1.0, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha = gamma, alpha

    def compute_loss(self, model, inputs, return_outputs=False):
        forget_out = model(**_keep(inputs["forget"]))
        retain_out = model(**_keep(inputs["retain"]))
        loss = -self.gamma * forget_out.loss + self.alpha * retain_out.loss
        return (loss, forget_out) if return_outputs else loss


class PlainGradDiff(GradDiffLike):
    """The same method, runnable without the mixin on a Trainer that passes num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs)


class NPOLike(Trainer):
    """NPO on forget (frozen deep-copied reference, forwarded without gradients) + NLL on retain;
    the newer ``compute_loss`` signature with ``num_items_in_batch`` (recorded)."""

    def __init__(self, *args, beta: float = 0.1, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.alpha = beta, alpha
        self.ref_model = copy.deepcopy(self.model).eval().to(self.args.device)
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self.seen_num_items = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_num_items.append(num_items_in_batch)
        forget, retain = _keep(inputs["forget"]), _keep(inputs["retain"])
        forget_out = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
        nll, _ = sequence_nll(forget_out.logits, forget["labels"])
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids=forget["input_ids"],
                                        attention_mask=forget["attention_mask"]).logits
            ref_nll, _ = sequence_nll(ref_logits, forget["labels"])
        retain_out = model(**retain)
        loss = npo_loss(nll, ref_nll, self.beta) + self.alpha * retain_out.loss
        return (loss, forget_out) if return_outputs else loss


class SelfReferenceGradDiff(PlainGradDiff):
    """GradDiff that first forwards the *trained* model on forget and retain without gradients
    (as a method would compute a reference with adapters disabled), then forwards forget twice
    with gradients: only the first gradient-enabled forward of each batch carries the features."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            model(**_keep(inputs["forget"]))
            model(**_keep(inputs["retain"]))
        result = super().compute_loss(model, inputs, return_outputs)
        model(**_keep(inputs["forget"]))  # a repeated forward whose output is unused
        return result


class CLRegGradDiff(CLRegMixin, GradDiffLike):
    pass


class CLRegNPO(CLRegMixin, NPOLike):
    pass


class CLRegSelfReference(CLRegMixin, SelfReferenceGradDiff):
    pass


def sequence_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer-token NLL: a loss whose mean over
    ranks equals its value on the ranks' rows together (equal rows per rank)."""
    nll_sum, n_tokens = sequence_nll(logits, labels)
    return (nll_sum / n_tokens.clamp_min(1)).mean()


class SeqMeanGradDiff(Trainer):
    """``-NLL(forget) + NLL(retain)`` with per-sequence means (``sequence_mean_nll``), so the
    method's own update does not depend on how a global batch is split over ranks."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = inputs["forget"], inputs["retain"]
        forget_out = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
        retain_out = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"])
        loss = (-sequence_mean_nll(forget_out.logits, forget["labels"])
                + sequence_mean_nll(retain_out.logits, retain["labels"]))
        return (loss, forget_out) if return_outputs else loss


class CLRegSeqMeanGradDiff(CLRegMixin, SeqMeanGradDiff):
    pass

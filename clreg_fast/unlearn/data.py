"""Question/answer examples for unlearning and the batch format the training loop consumes.

An example is a dict ``{"input_ids": [int], "labels": [int], "concept_id": int}`` where
``labels`` is -100 on prompt tokens (only answer tokens are learned or unlearned).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

IGNORE_INDEX = -100


def collate(examples: Sequence[Dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    The attention mask comes from the lengths, not from ``input_ids != pad_id``: with
    ``pad = eos`` the latter would hide the real EOS token at the end of each answer.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    concept_ids = torch.as_tensor([int(ex.get("concept_id", 0)) for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "concept_ids": concept_ids}


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T) mask of answer tokens (the positions whose label is learned)."""
    return labels != IGNORE_INDEX



"""A tiny random-init LLaMA and a small supervised fine-tuning loop to make target/oracle models.

The demo trains such a model on synthetic facts (the *target*, which knows the forget set) and
on the retain facts only (the *oracle*, the model unlearning should approach).
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

import torch

from clreg_fast.unlearn.data import collate


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4,
                      num_heads: int = 4, intermediate_size: Optional[int] = None,
                      max_position_embeddings: int = 64, pad_token_id: int = 0,
                      bos_token_id: int = 1, eos_token_id: int = 2):
    """A ``LlamaConfig`` for a few-layer model (the defaults: 4 layers, hidden 128, ~0.8M
    parameters plus the embeddings)."""
    from transformers import LlamaConfig

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True,
        attention_dropout=0.0, rms_norm_eps=1e-5,
    )


def make_tiny_llama(vocab_size: int, seed: int = 0, **config_kwargs):
    """A randomly initialised ``LlamaForCausalLM`` (float32, eval mode), seeded."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size, **config_kwargs)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Eager attention: the fastest path for tiny shapes on CPU, and deterministic.
    model.config._attn_implementation = "eager"
    return model.eval()


def finetune(model, examples: Sequence[Dict], epochs: int = 150, lr: float = 3e-3,
             batch_size: int = 32, weight_decay: float = 0.0, warmup_frac: float = 0.05,
             seed: int = 0, pad_id: int = 0, progress: bool = True,
             desc: str = "fine-tune") -> List[float]:
    """Supervised fine-tuning on the answer tokens (AdamW, linear warmup then cosine decay).

    Returns the mean training loss of every epoch. The model is left in eval mode.
    """
    if not examples:
        raise ValueError("finetune needs at least one example")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    rng = random.Random(seed)
    order = list(range(len(examples)))
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.98))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        rng.shuffle(order)
        epoch_loss = 0.0
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += out.loss.item()
        losses.append(epoch_loss / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses

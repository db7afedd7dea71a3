"""A lean unlearning loop for Hugging Face causal LMs, with an optional CLReg term.

One file, nothing hidden in a framework: single process, DDP or FSDP2 under ``torchrun``;
gradient accumulation; bf16 autocast on GPU; gradient checkpointing; AdamW with warm-up; one
forget mini-batch paired with one random retain mini-batch per step; periodic evaluation;
JSONL/CSV metrics; atomic checkpoints (``save_pretrained`` safetensors + optimizer, scheduler,
sampler and RNG state) and exact resume.

Batches. ``batch_size`` is the number of forget examples per *optimizer step over all ranks*;
each step takes ``batch_size`` forget and ``retain_batch_size`` retain indices from two
seeded, epoch-shuffled streams (the same on every rank) and cuts them into
``world_size * grad_accum`` equal micro-batches; micro-batch ``m = a * world_size + rank`` is
rank ``rank``'s accumulation step ``a``. Every loss term is normalized by its count over the
whole step (answer tokens for NLL, sequences for NPO/SimNPO/RMU), so the gradient is that of
the loss of the global batch, whatever the number of ranks or accumulation steps.

CLReg. The contrastive batch is one micro-batch: its forget rows (pooled hidden states of
``clreg_layer`` over answer tokens, or every answer token) and its retain rows, detached
("retain features stay put"; or the frozen reference model's features). Under DDP/FSDP each rank
therefore contrasts only its own rows (cross-rank CLReg is separate work); the CLReg loss of the
step is the mean over micro-batches. A single process with ``grad_accum = k`` makes the same
update as ``k`` ranks with ``grad_accum = 1``.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from clreg_fast.unlearn import methods as M
from clreg_fast.unlearn.data import IGNORE_INDEX, answer_mask, collate
from clreg_fast.unlearn.features import (POOLINGS, capture_layer, decoder_layers, pool_features,
                                         resolve_layer)

PARALLEL = ("none", "ddp", "fsdp")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
TRAINER_STATE = "trainer_state.pt"
HEAD_FILE = "clreg_head.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class UnlearnConfig:
    """Everything the loop needs besides the model and the data (see the module docstring)."""

    method: str = "graddiff"
    # CLReg term: clreg_weight * fused_clreg_loss(forget features, retain features, head).
    clreg_weight: float = 0.0
    clreg_layer: int = -1                 # decoder layer whose output is the feature; -1 = last
    clreg_pooling: str = "mean"           # "mean" | "last" | "token" over answer tokens
    clreg_label_by: str = "concept"       # "concept" (concept_id) | "sequence"
    clreg_temperature: float = 0.1
    clreg_proj_dim: Optional[int] = None  # int: a trainable nn.Linear(hidden, proj_dim) head
    clreg_retain_source: str = "model"    # "model" (detached) | "ref" (frozen reference model)
    clreg_fallback: str = "one_concept"   # no repeated concept in a micro-batch: see methods.clreg_term
    clreg_backend: str = "auto"
    # Method weights and hyper-parameters (OpenUnlearning defaults).
    forget_weight: Optional[float] = None  # gamma; None: 1, or simnpo_gamma for SimNPO
    retain_weight: float = 1.0             # alpha
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.0
    simnpo_gamma: float = 0.125
    rmu_layer: int = 7                     # clamped to the model's depth
    rmu_steering: float = 20.0
    rmu_train_layers: Optional[Sequence[int]] = None  # None: rmu_layer - 2 .. rmu_layer
    rmu_param_regex: str = r"mlp\.down_proj\.weight"
    cache_ref: bool = False                # NPO: compute reference log-probs once, up front
    # Optimization.
    optimizer: str = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0              # on matrices only (not norms/biases)
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"          # after warm-up: "constant" | "linear" | "cosine"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0   # None or 0: no clipping (the norm is still logged)
    max_steps: Optional[int] = None        # None: ceil(epochs * len(forget) / batch_size)
    epochs: float = 1.0
    batch_size: int = 8                    # forget examples per optimizer step, all ranks
    retain_batch_size: Optional[int] = None  # None: batch_size
    grad_accum: int = 1
    seed: int = 0
    # Runtime.
    parallel: str = "none"                 # "none" | "ddp" | "fsdp" (launch with torchrun)
    ddp_find_unused_parameters: bool = False  # for models with parameters the loss never uses
    bf16: Union[str, bool] = "auto"        # "auto": on CUDA devices that support bf16
    grad_checkpointing: bool = False
    attn_implementation: Optional[str] = None  # e.g. "flash_attention_2", "sdpa"
    device: Optional[str] = None           # None: cuda:LOCAL_RANK when CUDA exists, else cpu
    progress: bool = True
    eval_every: int = 0
    out_dir: Optional[str] = None
    save_every: int = 0
    save_final: bool = True
    keep_checkpoints: Optional[int] = None  # keep only the newest k checkpoint-N dirs
    resume: Union[bool, str] = False        # True: newest checkpoint in out_dir; or a path

    def __post_init__(self):
        choices = {"method": M.METHODS, "clreg_pooling": POOLINGS, "parallel": PARALLEL,
                   "lr_schedule": SCHEDULES, "optimizer": OPTIMIZERS,
                   "clreg_label_by": ("concept", "sequence"),
                   "clreg_retain_source": ("model", "ref"),
                   "clreg_fallback": ("one_concept", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.retain_batch_size is not None and (not isinstance(self.retain_batch_size, int)
                                                   or self.retain_batch_size < 1):
            raise ValueError(f"retain_batch_size must be None or an int >= 1, "
                             f"got {self.retain_batch_size!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            raise ValueError(f"max_steps must be None or an int >= 0, got {self.max_steps!r}")
        for name in ("lr", "clreg_temperature", "npo_beta", "simnpo_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("clreg_weight", "weight_decay", "retain_weight", "epochs", "warmup_steps",
                     "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.clreg_proj_dim is not None and (not isinstance(self.clreg_proj_dim, int)
                                                or self.clreg_proj_dim < 1):
            raise ValueError(f"clreg_proj_dim must be None or an int >= 1, got {self.clreg_proj_dim!r}")
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"bf16 must be 'auto', True or False, got {self.bf16!r}")
        if (self.save_every or self.resume) and not self.out_dir and not isinstance(self.resume, str):
            raise ValueError("save_every and resume=True need out_dir")

    @property
    def gamma(self) -> float:
        if self.forget_weight is not None:
            return float(self.forget_weight)
        return self.simnpo_gamma if self.method == "simnpo" else 1.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        if out["rmu_train_layers"] is not None:
            out["rmu_train_layers"] = list(out["rmu_train_layers"])
        return out


# --------------------------------------------------------------------------- distributed setup

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.enabled and self.world > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(parallel: str) -> _Dist:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if env_world > 1 or (dist.is_available() and dist.is_initialized()
                             and dist.get_world_size() > 1):
            raise ValueError(f"launched with WORLD_SIZE={env_world} but parallel='none'; "
                             "use parallel='ddp' or 'fsdp' under torchrun")
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # a plain `python` run: a one-process group so the same code path runs
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created)


def _fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy)`` from wherever this torch keeps FSDP2."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


# --------------------------------------------------------------------------- data streams

class IndexStream:
    """Endless epoch-shuffled indices of a dataset; the state is ``(epoch, position)``.

    Epoch e is ``randperm(n)`` from a generator seeded by ``(seed, salt, e)``, so the stream is
    the same on every rank and resumes exactly from its two-integer state.
    """

    def __init__(self, n: int, seed: int, salt: int):
        if n < 1:
            raise ValueError("a dataset for the unlearning loop must have at least one example")
        self.n, self.seed, self.salt = n, int(seed), int(salt)
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.salt * 7_919 + epoch) % (2 ** 63))
        return torch.randperm(self.n, generator=generator).tolist()

    def take(self, count: int) -> List[int]:
        out = []
        while len(out) < count:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            grab = min(count - len(out), self.n - self.position)
            out.extend(self._perm[self.position:self.position + grab])
            self.position += grab
        return out

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint sampler saw {state['n']} examples, this run has {self.n}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def _answer_counts(example: dict) -> Tuple[int, int]:
    """(shifted NLL tokens, answer tokens) of one example."""
    labels = example["labels"]
    return (sum(1 for t in labels[1:] if t != IGNORE_INDEX),
            sum(1 for t in labels if t != IGNORE_INDEX))


def _check_examples(name: str, examples) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"{name} must be a non-empty list of examples")
    for i, ex in enumerate(examples[:8]):
        if not isinstance(ex, dict) or "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"{name}[{i}] must be a dict with input_ids and labels")
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"{name}[{i}] has {len(ex['input_ids'])} input_ids but "
                             f"{len(ex['labels'])} labels")


# --------------------------------------------------------------------------- the objective

def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Objective(nn.Module):
    """The model, the optional CLReg projection head and the loss of one micro-batch.

    DDP and FSDP wrap this module (not the bare model), so one wrapped forward computes every
    term of a micro-batch, the projection head is synchronized with the model, and early-stopped
    feature forwards end inside it.
    """

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, head: Optional[nn.Linear],
                 clreg_layer: int, rmu_layer: int, control: Optional[torch.Tensor]):
        super().__init__()
        self.model = model
        self.head = head
        self.cfg = cfg
        self.clreg_layer = clreg_layer
        self.rmu_layer = rmu_layer
        self._control = control  # a plain attribute: not a parameter, not in the state dict

    # -- pieces
    def _run(self, batch, layers: Sequence[int], want_logits: bool):
        """Forward of the model; returns (logits or None, {layer: hidden})."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False)
        if not layers:
            return self.model(**kwargs).logits, {}
        with capture_layer(self.model, layers, stop=not want_logits) as cap:
            out = cap.run(**kwargs)
            hidden = {layer: cap[layer] for layer in layers}
        return (out.logits if want_logits else None), hidden

    def _clreg(self, forget_hidden, forget, retain_hidden, retain):
        cfg = self.cfg
        f_feats, f_labels = pool_features(forget_hidden, answer_mask(forget["labels"]),
                                          cfg.clreg_pooling, forget["concept_ids"],
                                          cfg.clreg_label_by)
        r_feats = None
        if retain_hidden is not None:
            r_feats, _ = pool_features(retain_hidden.detach(), answer_mask(retain["labels"]),
                                       cfg.clreg_pooling, retain["concept_ids"], cfg.clreg_label_by)
        weight = bias = None
        dtype = torch.float32
        if self.head is not None:
            weight, bias = self.head.weight, self.head.bias
            dtype = weight.dtype
        f_feats = f_feats.to(dtype)
        r_feats = r_feats.to(dtype) if r_feats is not None else None
        loss, info = M.clreg_term(f_feats, f_labels, r_feats, weight, bias,
                                  temperature=cfg.clreg_temperature, fallback=cfg.clreg_fallback,
                                  backend=cfg.clreg_backend)
        if loss is None:
            loss = f_feats.sum() * 0.0
        if self.head is not None:
            # Keeps the head in the graph when the term is skipped, so DDP/FSDP see its grads.
            loss = loss + sum(p.sum() * 0.0 for p in self.head.parameters())
        return loss, info

    def forward(self, forget, retain, norms: Dict[str, float], ref: Dict[str, torch.Tensor]):
        cfg = self.cfg
        use_clreg = cfg.clreg_weight > 0
        cl = self.clreg_layer
        logs: Dict[str, torch.Tensor] = {}
        retain_hidden_for_clreg = ref.get("clreg_retain_hidden")

        with _autocast(norms["autocast"], forget["input_ids"].device):
            if cfg.method == "rmu":
                layers = sorted({self.rmu_layer} | ({cl} if use_clreg else set()))
                _, f_hidden = self._run(forget, layers, want_logits=False)
                r_layers = sorted({self.rmu_layer} | (
                    {cl} if use_clreg and cfg.clreg_retain_source == "model" else set()))
                _, r_hidden = self._run(retain, r_layers, want_logits=False)
                forget_term = M.masked_token_mse(f_hidden[self.rmu_layer], self._control,
                                                 answer_mask(forget["labels"]), norms["forget_seqs"])
                retain_term = M.masked_token_mse(r_hidden[self.rmu_layer], ref["rmu_retain_hidden"],
                                                 answer_mask(retain["labels"]), norms["retain_seqs"])
                if use_clreg and cfg.clreg_retain_source == "model":
                    retain_hidden_for_clreg = r_hidden[cl]
            else:
                f_layers = [cl] if use_clreg else []
                f_logits, f_hidden = self._run(forget, f_layers, want_logits=True)
                nll_sum, n_tok = M.sequence_nll(f_logits, forget["labels"])
                if cfg.method in ("gradascent", "graddiff"):
                    forget_term = -nll_sum.sum() / norms["forget_tokens"]
                elif cfg.method == "npo":
                    forget_term = M.npo_loss(nll_sum, ref["forget_nll"], cfg.npo_beta,
                                             norms["forget_seqs"])
                else:
                    forget_term = M.simnpo_loss(nll_sum, n_tok, cfg.simnpo_beta, cfg.simnpo_delta,
                                                norms["forget_seqs"])
                logs["forget_nll"] = (nll_sum.sum() / norms["forget_tokens"]).detach()
                want_retain_feats = use_clreg and cfg.clreg_retain_source == "model"
                if M.USES_RETAIN_LOSS[cfg.method]:
                    r_logits, r_hidden = self._run(retain, [cl] if want_retain_feats else [],
                                                   want_logits=True)
                    retain_term = M.sequence_nll(r_logits, retain["labels"])[0].sum() \
                        / norms["retain_tokens"]
                    if want_retain_feats:
                        retain_hidden_for_clreg = r_hidden[cl]
                else:
                    retain_term = None
                    if want_retain_feats:
                        with torch.no_grad():  # features only: stop after the CLReg layer
                            _, r_hidden = self._run(retain, [cl], want_logits=False)
                        retain_hidden_for_clreg = r_hidden[cl]

        loss = cfg.gamma * forget_term
        logs["forget_loss"] = forget_term.detach()
        if retain_term is not None:
            loss = loss + cfg.retain_weight * retain_term
            logs["retain_loss"] = retain_term.detach()
        if use_clreg:
            # CLReg in its own precision (autocast would push the similarity GEMMs to bf16).
            with _autocast(False, forget["input_ids"].device):
                clreg, info = self._clreg(f_hidden[cl], forget, retain_hidden_for_clreg, retain)
            clreg = clreg / norms["micro_batches"]
            loss = loss + cfg.clreg_weight * clreg
            logs["clreg_loss"] = clreg.detach()
            for key, value in info.items():
                logs[key] = torch.tensor(value / norms["micro_batches"], device=loss.device)
        logs["loss"] = loss.detach()
        return loss, logs


class _FrozenReference(nn.Module):
    """The frozen reference model: NLL sums and/or early-stopped layer features, no grad."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, batch, layers: Tuple[int, ...], want_nll: bool, use_autocast: bool):
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False)
        with _autocast(use_autocast, batch["input_ids"].device):
            if not layers:
                return M.sequence_nll(self.model(**kwargs).logits, batch["labels"])[0], {}
            with capture_layer(self.model, layers, stop=not want_nll) as cap:
                out = cap.run(**kwargs)
                hidden = {layer: cap[layer] for layer in layers}
            nll = M.sequence_nll(out.logits, batch["labels"])[0] if want_nll else None
        return nll, hidden


def _autocast(enabled: bool, device: torch.device):
    if not enabled:  # also switches off an autocast region opened around this one
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- optimizer & schedule

def _lr_factor(step: int, cfg: UnlearnConfig, total: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(total - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(module: nn.Module, cfg: UnlearnConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def _clip_and_norm(params: List[torch.Tensor], max_norm: Optional[float]) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    limit = float(max_norm) if max_norm else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(grads, limit)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# --------------------------------------------------------------------------- checkpoints

def _latest_checkpoint(out_dir: str) -> Optional[str]:
    if not out_dir or not os.path.isdir(out_dir):
        return None
    found = []
    for name in os.listdir(out_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(out_dir, name, TRAINER_STATE)):
            found.append((int(match.group(1)), name))
    return os.path.join(out_dir, max(found)[1]) if found else None


def _atomic_dir_write(final_dir: str, write: Callable[[str], None]) -> None:
    """Write into a fresh temporary sibling directory, then rename it into place."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final_dir) + "-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        write(tmp)
        if os.path.exists(final_dir):  # rename() cannot replace a non-empty directory
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(final_dir, os.path.join(old, "d"))
            os.replace(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_pretrained(model: nn.Module, directory: str, state_dict=None) -> None:
    import inspect

    from transformers.utils import logging as hf_logging

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers < 5; 5.x always writes safetensors
    # Keep the loop's own progress bar readable: no nested "writing shards" bar per save.
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, state_dict=state_dict, **kwargs)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def _load_model_weights(model: nn.Module, directory: str) -> None:
    """Load the safetensors written by ``save_pretrained`` into ``model`` (tied weights allowed)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory)
                   if f.endswith(".safetensors") and f != HEAD_FILE)
    if not files:
        raise FileNotFoundError(f"no model *.safetensors in {directory}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    result = model.load_state_dict(state, strict=False)
    # Parameters missing from the file must be tied to one that was loaded (e.g. lm_head).
    by_name = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(by_name[k]) for k in state if k in by_name}
    missing = [k for k in result.missing_keys if k not in by_name or id(by_name[k]) not in loaded_ids]
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def _gather_rng(d: _Dist) -> list:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if d.enabled and d.world > 1:
        states = [None] * d.world
        dist.all_gather_object(states, state)
        return states
    return [state]


# --------------------------------------------------------------------------- the loop

def unlearn(
    model: nn.Module,
    forget_examples: Sequence[dict],
    retain_examples: Sequence[dict],
    cfg: Optional[UnlearnConfig] = None,
    ref_model: Optional[nn.Module] = None,
    pad_id: int = 0,
    eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
) -> List[Dict[str, float]]:
    """Unlearn ``forget_examples`` from ``model`` in place; returns the per-step log.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ...). It is moved to the run's
            device and trained in place; its ``requires_grad`` flags and train/eval mode are
            restored at the end.
        forget_examples, retain_examples: lists of ``{"input_ids", "labels", "concept_id"}``
            dicts (labels -100 on prompt tokens), batched by ``data.collate``.
        cfg: the :class:`UnlearnConfig`.
        ref_model: frozen reference for NPO and RMU; None makes a deep copy of ``model`` before
            the first step (and before any resumed weights are loaded).
        pad_id: padding token id for ``collate``.
        eval_fn: ``eval_fn(model) -> {name: float}``, run every ``eval_every`` steps and after
            the last step, in eval mode under ``torch.no_grad``. Under DDP/FSDP it runs on every
            rank (FSDP needs every rank in each forward); the rank-0 values are logged.

    Under ``parallel="ddp"``/``"fsdp"`` the default process group is initialized from the
    torchrun environment when needed (NCCL on CUDA, gloo on CPU) and left initialized. After an
    FSDP run the model's parameters stay sharded (DTensors); save it with ``out_dir`` (the
    ``final/`` directory holds the full weights) or gather it with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict``.

    Returns:
        One dict per optimizer step: ``step``, ``epoch`` (forget epochs done), ``lr`` (used for
        the step), ``loss``, ``forget_loss`` (before gamma), ``forget_nll``, ``retain_loss``
        (before alpha), ``clreg_loss`` (before clreg_weight), ``clreg_fallback`` and
        ``clreg_skipped`` (fractions of micro-batches), ``grad_norm`` (before clipping), and
        ``eval_<name>`` on eval steps. Values are over the global batch (reduced over ranks).

    The global torch RNG is reseeded with ``seed + rank`` (dropout streams).
    """
    cfg = cfg if cfg is not None else UnlearnConfig()
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"cfg must be an UnlearnConfig, got {type(cfg).__name__}")
    _check_examples("forget_examples", forget_examples)
    _check_examples("retain_examples", retain_examples)
    d = _init_distributed(cfg.parallel)
    # A process group created here stays up: under FSDP the returned model is sharded and
    # needs it. Call torch.distributed.destroy_process_group() when done (the CLI does).
    return _unlearn(model, list(forget_examples), list(retain_examples), cfg, ref_model,
                    pad_id, eval_fn, d)


def _unlearn(model, forget_examples, retain_examples, cfg: UnlearnConfig, ref_model, pad_id,
             eval_fn, d: _Dist) -> List[Dict[str, float]]:
    micro = d.world * cfg.grad_accum
    retain_bs = cfg.retain_batch_size or cfg.batch_size
    for name, size in (("batch_size", cfg.batch_size), ("retain_batch_size", retain_bs)):
        if size % micro:
            raise ValueError(f"{name}={size} must be divisible by world_size * grad_accum = "
                             f"{d.world} * {cfg.grad_accum}")
    f_mb, r_mb = cfg.batch_size // micro, retain_bs // micro
    total_steps = cfg.max_steps if cfg.max_steps is not None else \
        math.ceil(cfg.epochs * len(forget_examples) / cfg.batch_size)

    if cfg.device is not None:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    elif torch.cuda.is_available():
        device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    use_bf16 = (cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda"
                                     and torch.cuda.is_bf16_supported()))
    fsdp_mp = use_bf16 and cfg.parallel == "fsdp"  # FSDP2 casts by policy, not autocast
    use_autocast = use_bf16 and not fsdp_mp

    # Resolve the checkpoint to resume from before touching the model.
    resume_dir = None
    if cfg.resume:
        resume_dir = cfg.resume if isinstance(cfg.resume, str) else _latest_checkpoint(cfg.out_dir)
        if isinstance(cfg.resume, str) and not os.path.isfile(os.path.join(resume_dir, TRAINER_STATE)):
            raise FileNotFoundError(f"resume={cfg.resume!r} is not a checkpoint ({TRAINER_STATE} missing)")

    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    config = getattr(model, "config", None)
    saved_use_cache = getattr(config, "use_cache", None)
    needs_ref = M.NEEDS_REFERENCE[cfg.method] or (cfg.clreg_weight > 0
                                                  and cfg.clreg_retain_source == "ref")
    if needs_ref and ref_model is None:
        ref_model = copy.deepcopy(model)  # the model before unlearning (before resumed weights)
    if cfg.attn_implementation:
        _set_attn_implementation(model, cfg.attn_implementation)
        if ref_model is not None:
            _set_attn_implementation(ref_model, cfg.attn_implementation)

    clreg_layer = resolve_layer(model, cfg.clreg_layer)
    rmu_layer = resolve_layer(model, cfg.rmu_layer, clamp=True)
    hidden_size = _hidden_size(model)

    try:
        if resume_dir:
            _load_model_weights(model, resume_dir)
        if cfg.parallel != "fsdp":
            # fully_shard moves each block to the device as it shards it, so under FSDP a
            # model loaded on the CPU never sits whole on one GPU.
            model.to(device)
        model.train()
        if cfg.method == "rmu":
            _freeze_for_rmu(model, cfg, rmu_layer)
        if cfg.grad_checkpointing:
            _enable_checkpointing(model)
        if config is not None:
            config.use_cache = False  # no KV cache in training forwards

        head = None
        if cfg.clreg_weight > 0 and cfg.clreg_proj_dim:
            head = nn.Linear(hidden_size, cfg.clreg_proj_dim)
            generator = torch.Generator().manual_seed(cfg.seed + 17)
            bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's default init, seeded for all ranks
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
            if resume_dir and os.path.isfile(os.path.join(resume_dir, HEAD_FILE)):
                from safetensors.torch import load_file
                head.load_state_dict(load_file(os.path.join(resume_dir, HEAD_FILE)))
            head.to(device)
        control = (M.rmu_control_vector(hidden_size, cfg.rmu_steering, cfg.seed, device)
                   if cfg.method == "rmu" else None)
        objective = _Objective(model, cfg, head, clreg_layer, rmu_layer, control)

        reference = None
        if needs_ref:
            if cfg.parallel != "fsdp":
                ref_model.to(device)
            ref_model.eval()
            ref_model.requires_grad_(False)
            reference = _FrozenReference(ref_model)

        wrapped: nn.Module = objective
        if cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=cfg.ddp_find_unused_parameters)
        elif cfg.parallel == "fsdp":
            fully_shard, MixedPrecisionPolicy = _fsdp_api()
            kwargs, root_kwargs = {}, {}
            if fsdp_mp:
                kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                           reduce_dtype=torch.float32)
                # The objective's float inputs are the reference's float32 NLL sums (NPO):
                # cast to bf16 they would shift log p - log p_ref by up to ~1%.
                root_kwargs["mp_policy"] = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                    cast_forward_inputs=False)
            for block in decoder_layers(model):
                fully_shard(block, **kwargs)
            fully_shard(objective, **root_kwargs)
            if reference is not None:
                for block in decoder_layers(ref_model):
                    fully_shard(block, **kwargs)
                fully_shard(reference, **kwargs)

        optimizer = _make_optimizer(objective, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, cfg, total_steps))
        params = [p for p in objective.parameters() if p.requires_grad]

        forget_counts = [_answer_counts(ex) for ex in forget_examples]
        retain_counts = [_answer_counts(ex) for ex in retain_examples]
        forget_stream = IndexStream(len(forget_examples), cfg.seed, salt=1)
        retain_stream = IndexStream(len(retain_examples), cfg.seed, salt=2)
        torch.manual_seed(cfg.seed + d.rank)  # dropout etc.; differs across ranks on purpose
        history: List[Dict[str, float]] = []
        start_step = 0
        if resume_dir:
            state = torch.load(os.path.join(resume_dir, TRAINER_STATE), map_location="cpu",
                               weights_only=True)
            _load_optimizer(objective, optimizer, state["optimizer"], cfg)
            scheduler.load_state_dict(state["scheduler"])
            forget_stream.load_state_dict(state["forget_stream"])
            retain_stream.load_state_dict(state["retain_stream"])
            rng = state["rng"]
            if len(rng) != d.world:
                warnings.warn(f"checkpoint was written by {len(rng)} ranks, this run has "
                              f"{d.world}; RNG streams (dropout) will differ")
            own = rng[d.rank % len(rng)]
            torch.set_rng_state(own["cpu"])
            if "cuda" in own and torch.cuda.is_available():
                torch.cuda.set_rng_state(own["cuda"])
            history = list(state["history"])
            start_step = int(state["step"])

        ref_forget_nll = None
        if cfg.method == "npo" and cfg.cache_ref:
            ref_forget_nll = _precompute_ref_nll(reference, forget_examples, f_mb, pad_id, device,
                                                 use_autocast, d, cfg.progress)

        metrics = _MetricsWriter(cfg.out_dir if d.rank == 0 else None, history, cfg)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        bar = None
        if tqdm is not None:
            bar = tqdm(total=total_steps, initial=start_step, desc=f"unlearn[{cfg.method}]",
                       disable=not cfg.progress or d.rank != 0, dynamic_ncols=True)

        for step in range(start_step, total_steps):
            forget_idx = forget_stream.take(cfg.batch_size)
            retain_idx = retain_stream.take(retain_bs)
            norms = _normalizers(forget_counts, retain_counts, forget_idx, retain_idx, micro)
            norms["autocast"] = use_autocast
            lr = optimizer.param_groups[0]["lr"]
            log_sums: Dict[str, torch.Tensor] = {}
            for a in range(cfg.grad_accum):
                m = a * d.world + d.rank
                f_ids = forget_idx[m * f_mb:(m + 1) * f_mb]
                r_ids = retain_idx[m * r_mb:(m + 1) * r_mb]
                forget = _to_device(collate([forget_examples[i] for i in f_ids], pad_id), device)
                retain = _to_device(collate([retain_examples[i] for i in r_ids], pad_id), device)
                ref = _reference_inputs(reference, cfg, forget, retain, f_ids, ref_forget_nll,
                                        rmu_layer, clreg_layer, use_autocast)
                last = a == cfg.grad_accum - 1
                sync = contextlib.nullcontext()
                if cfg.parallel == "ddp" and not last:
                    sync = wrapped.no_sync()
                elif cfg.parallel == "fsdp":
                    objective.set_requires_gradient_sync(last)
                with sync:
                    loss, logs = wrapped(forget, retain, norms, ref)
                    # DDP/FSDP average gradients over ranks; the loss is already normalized
                    # by global counts, so scale by world size to get the gradient of the sum.
                    (loss * d.world).backward()
                for key, value in logs.items():
                    log_sums[key] = log_sums.get(key, 0.0) + value.detach().float()
            grad_norm = _clip_and_norm(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            record = {"step": step + 1, "epoch": forget_stream.epochs_done, "lr": lr}
            record.update(_reduce_logs(log_sums, d, device))
            record["grad_norm"] = grad_norm
            done = step + 1
            if eval_fn is not None and cfg.eval_every and (done % cfg.eval_every == 0
                                                           or done == total_steps):
                record.update(_run_eval(eval_fn, model, objective, cfg))
            history.append(record)
            metrics.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if cfg.out_dir and cfg.save_every and done % cfg.save_every == 0:
                _save_checkpoint(os.path.join(cfg.out_dir, f"checkpoint-{done}"), model, objective,
                                 optimizer, scheduler, forget_stream, retain_stream, history, done,
                                 cfg, d)
                metrics.write_csv()
        if bar is not None:
            bar.close()
        if cfg.out_dir and cfg.save_final:
            _save_final(os.path.join(cfg.out_dir, "final"), model, objective, cfg, d)
        metrics.write_csv()
        return history
    finally:
        if cfg.grad_checkpointing:
            for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
                if hasattr(model, name):
                    getattr(model, name)()
                    break
        for name, p in model.named_parameters():
            if name in saved_flags:
                p.requires_grad_(saved_flags[name])
        model.train(was_training)
        if config is not None and saved_use_cache is not None:
            config.use_cache = saved_use_cache


# --------------------------------------------------------------------------- loop helpers

def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return model.get_input_embeddings().weight.shape[1]


def _enable_checkpointing(model: nn.Module) -> None:
    """Per-block activation checkpointing, non-reentrant (works with frozen inputs and FSDP2)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            warnings.warn("attn_implementation='flash_attention_2' asked for but flash-attn is not "
                          "installed; keeping the model's attention implementation")
            return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _freeze_for_rmu(model: nn.Module, cfg: UnlearnConfig, rmu_layer: int) -> None:
    """RMU trains only the matching parameters of a few layers at and below the steered one."""
    layers = cfg.rmu_train_layers
    if layers is None:
        layers = range(max(rmu_layer - 2, 0), rmu_layer + 1)
    indices = sorted({resolve_layer(model, int(i), clamp=True) for i in layers})
    # RMU forwards stop after the steered layer (or the CLReg layer), so deeper layers get no
    # gradient: training them would do nothing (and would stall DDP's gradient reduction).
    deepest = max(rmu_layer, resolve_layer(model, cfg.clreg_layer) if cfg.clreg_weight > 0 else 0)
    if indices[-1] > deepest:
        raise ValueError(f"rmu_train_layers={list(layers)} reaches layer {indices[-1]}, past "
                         f"rmu_layer={rmu_layer} where the RMU forward stops")
    pattern = re.compile(cfg.rmu_param_regex)
    model.requires_grad_(False)
    blocks = decoder_layers(model)
    chosen = 0
    for index in indices:
        for name, p in blocks[index].named_parameters():
            if pattern.search(name):
                p.requires_grad_(True)
                chosen += 1
    if not chosen:
        raise ValueError(f"rmu_param_regex={cfg.rmu_param_regex!r} matches no parameter of "
                         f"decoder layers {indices}")


def _normalizers(forget_counts, retain_counts, forget_idx, retain_idx, micro) -> dict:
    """Counts over the whole optimizer step (all ranks, all accumulation steps)."""
    f_counts = [forget_counts[i] for i in forget_idx]
    r_counts = [retain_counts[i] for i in retain_idx]
    return {
        "forget_tokens": float(max(sum(c[0] for c in f_counts), 1)),
        "retain_tokens": float(max(sum(c[0] for c in r_counts), 1)),
        "forget_seqs": float(len(forget_idx)),
        "retain_seqs": float(len(retain_idx)),
        "micro_batches": float(micro),
    }


def _reference_inputs(reference, cfg, forget, retain, f_ids, ref_forget_nll, rmu_layer,
                      clreg_layer, use_autocast) -> Dict[str, torch.Tensor]:
    ref: Dict[str, torch.Tensor] = {}
    if cfg.method == "npo":
        if ref_forget_nll is not None:
            ref["forget_nll"] = ref_forget_nll[f_ids].to(forget["input_ids"].device)
        else:
            ref["forget_nll"] = reference(forget, (), True, use_autocast)[0]
    layers = set()
    if cfg.method == "rmu":
        layers.add(rmu_layer)
    if cfg.clreg_weight > 0 and cfg.clreg_retain_source == "ref":
        layers.add(clreg_layer)
    if layers:
        _, hidden = reference(retain, tuple(sorted(layers)), False, use_autocast)
        if cfg.method == "rmu":
            ref["rmu_retain_hidden"] = hidden[rmu_layer]
        if clreg_layer in hidden and cfg.clreg_retain_source == "ref":
            ref["clreg_retain_hidden"] = hidden[clreg_layer]
    return ref


def _precompute_ref_nll(reference, examples, micro_bs, pad_id, device, use_autocast, d, progress):
    """Reference NLL sums of every forget example, computed once; ranks split the work."""
    n = len(examples)
    mine = list(range(d.rank, n, d.world))
    per_rank = math.ceil(n / d.world)
    n_batches = math.ceil(per_rank / micro_bs)  # the same on every rank: FSDP needs lockstep
    out = torch.zeros(n, dtype=torch.float32, device=device)
    try:
        from tqdm.auto import tqdm
        batches = tqdm(range(n_batches), desc="reference log-probs", leave=False,
                       disable=not progress or d.rank != 0)
    except ImportError:  # pragma: no cover
        batches = range(n_batches)
    for b in batches:
        ids = mine[b * micro_bs:(b + 1) * micro_bs]
        real = len(ids)
        ids = ids + [0] * (micro_bs - real)  # dummy rows keep every rank's batch count equal
        batch = _to_device(collate([examples[i] for i in ids], pad_id), device)
        nll, _ = reference(batch, (), True, use_autocast)
        if real:
            out[torch.as_tensor(ids[:real], device=device)] = nll[:real].float()
    d.all_reduce_sum(out)
    return out.cpu()


def _reduce_logs(log_sums: Dict[str, torch.Tensor], d: _Dist, device) -> Dict[str, float]:
    keys = sorted(log_sums)
    if not keys:
        return {}
    values = torch.stack([torch.as_tensor(log_sums[k], device=device).float() for k in keys])
    d.all_reduce_sum(values)
    return {k: float(v) for k, v in zip(keys, values.tolist())}


@contextlib.contextmanager
def _full_params(objective: nn.Module, cfg: UnlearnConfig):
    """Under FSDP, gather the root's parameters so the bare model can be called directly."""
    if cfg.parallel == "fsdp":
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()
    else:
        yield


def _run_eval(eval_fn, model, objective, cfg) -> Dict[str, float]:
    model.eval()
    try:
        with torch.no_grad(), _full_params(objective, cfg):
            results = eval_fn(model) or {}
    finally:
        model.train()
    def plain(value):  # numbers (and 0-d tensors) become floats; anything else stays as is
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
        return float(value) if isinstance(value, (int, float)) else value

    return {f"eval_{k}": plain(v) for k, v in results.items()}


def _load_optimizer(objective, optimizer, state, cfg) -> None:
    if cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(objective, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _full_state(objective, optimizer, cfg):
    """(model state dict or None, head state dict or None, optimizer state dict) for rank 0."""
    if cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(objective, options=options)
        optim = get_optimizer_state_dict(objective, optimizer, options=options) \
            if optimizer is not None else None
        model_sd = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        head_sd = {k[len("head."):]: v for k, v in full.items() if k.startswith("head.")}
        return model_sd, head_sd or None, optim
    head_sd = objective.head.state_dict() if objective.head is not None else None
    return None, head_sd, optimizer.state_dict() if optimizer is not None else None


def _write_model_dir(directory, model, model_sd, head_sd, cfg) -> None:
    _save_pretrained(model, directory, state_dict=model_sd)
    if head_sd:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in head_sd.items()},
                  os.path.join(directory, HEAD_FILE))
    with open(os.path.join(directory, "unlearn_config.json"), "w") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)


def _save_checkpoint(directory, model, objective, optimizer, scheduler, forget_stream,
                     retain_stream, history, step, cfg, d: _Dist) -> None:
    model_sd, head_sd, optim_sd = _full_state(objective, optimizer, cfg)  # collective under FSDP
    rng = _gather_rng(d)  # collective
    if d.rank == 0:
        state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 "forget_stream": forget_stream.state_dict(),
                 "retain_stream": retain_stream.state_dict(), "rng": rng,
                 "history": history, "step": step, "world_size": d.world}

        def write(tmp):
            _write_model_dir(tmp, model, model_sd, head_sd, cfg)
            torch.save(state, os.path.join(tmp, TRAINER_STATE))

        _atomic_dir_write(directory, write)
        _prune_checkpoints(cfg)
    d.barrier()


def _save_final(directory, model, objective, cfg, d: _Dist) -> None:
    model_sd, head_sd, _ = _full_state(objective, None, cfg)
    if d.rank == 0:
        _atomic_dir_write(directory, lambda tmp: _write_model_dir(tmp, model, model_sd, head_sd, cfg))
    d.barrier()


def _prune_checkpoints(cfg) -> None:
    if not cfg.keep_checkpoints:
        return
    found = sorted((int(m.group(1)), name) for name in os.listdir(cfg.out_dir)
                   if (m := CHECKPOINT_RE.match(name)))
    for _, name in found[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(cfg.out_dir, name), ignore_errors=True)


class _MetricsWriter:
    """``metrics.jsonl`` (one line per step, flushed) and ``metrics.csv`` in out_dir, rank 0."""

    def __init__(self, out_dir: Optional[str], history: List[dict], cfg: UnlearnConfig):
        self.out_dir = out_dir
        self.history = history
        if out_dir is None:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "unlearn_config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
        # A resumed run drops what the interrupted run logged after its checkpoint.
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as fh:
            for record in history:
                fh.write(json.dumps(record) + "\n")

    def append(self, record: dict) -> None:
        if self.out_dir is None:
            return
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_csv(self) -> None:
        if self.out_dir is None or not self.history:
            return
        columns: List[str] = []
        for record in self.history:
            columns.extend(k for k in record if k not in columns)
        path = os.path.join(self.out_dir, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(path + ".tmp", path)

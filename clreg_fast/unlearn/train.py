"""A lean unlearning loop for Hugging Face causal LMs, with an optional CLReg term.

One file, nothing hidden in a framework: single process, DDP or FSDP2 under ``torchrun``;
gradient accumulation; bf16 autocast on GPU; gradient checkpointing; AdamW with warm-up; one
forget mini-batch paired with one random retain mini-batch per step; periodic evaluation;
JSONL/CSV metrics; atomic checkpoints (``save_pretrained`` safetensors + optimizer, scheduler,
sampler and RNG state) and exact resume. The plumbing lives next door: ``distributed.py``
(process group, DDP/FSDP2 wrapping), ``checkpoint.py`` (save, load, resume) and
``metrics_log.py`` (log files); the losses are in ``methods.py``.

Batches. ``batch_size`` is the number of forget examples per *optimizer step over all ranks*;
each step takes ``batch_size`` forget and ``retain_batch_size`` retain indices from two
seeded, epoch-shuffled streams (the same on every rank) and cuts them into
``world_size * grad_accum`` equal micro-batches; micro-batch ``m = a * world_size + rank`` is
rank ``rank``'s accumulation step ``a``. Every loss term is normalized by its count over the
whole step (answer tokens for NLL, sequences for NPO/SimNPO/RMU), so the gradient is that of
the loss of the global batch, whatever the number of ranks or accumulation steps.

CLReg. The features are the forget rows (pooled hidden states of ``clreg_layer`` over answer
tokens, or every answer token) and the retain rows, detached ("retain features stay put"; or the
frozen reference model's features). ``clreg_negatives`` says which rows form one contrastive
batch:

* ``"local"``: one micro-batch. Under DDP/FSDP each rank contrasts only its own rows; the CLReg
  loss of the step is the mean over the ``world_size * grad_accum`` micro-batches, so a single
  process with ``grad_accum = k`` makes the same update as ``k`` ranks with ``grad_accum = 1``.
* ``"global"``: at accumulation step ``a``, the union of every rank's micro-batch ``a``
  (``fused_clreg_loss(process_group=)`` on a group of its own, apart from DDP's buckets); the
  CLReg loss of the step is the mean over the ``grad_accum`` accumulation steps. With
  ``grad_accum = 1`` the update is that of one process on the whole step's batch, whatever the
  number of ranks; in general it is that of one process with the same ``grad_accum``.

``clreg_queue_size > 0`` keeps that many earlier retain rows (projected and normalized, in a
``RetainFeatureQueue`` outside the wrapped model) as extra negatives. Each contrastive batch
pushes its retain rows after its backward; with ``"global"`` the queue gathers every rank's rows
(the same queue on every rank), with ``"local"`` each rank keeps its own. The queue is saved in
every checkpoint and restored on resume.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from clreg_fast.unlearn import checkpoint
from clreg_fast.unlearn import methods as M
from clreg_fast.unlearn.data import IGNORE_INDEX, answer_mask, collate
from clreg_fast.unlearn.distributed import (DistInfo, full_params, init_distributed, reduce_logs,
                                            side_group, wrap)
from clreg_fast.unlearn.features import (POOLINGS, capture_layer, decoder_layers, pool_features,
                                         resolve_layer)
from clreg_fast.unlearn.metrics_log import MetricsLog

PARALLEL = ("none", "ddp", "fsdp")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
CLREG_NEGATIVES = ("local", "global")


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
    clreg_fallback: str = "one_concept"   # no repeated concept in a CLReg batch: methods.clreg_term
    clreg_backend: str = "auto"
    clreg_negatives: str = "local"        # "local" (one micro-batch) | "global" (all ranks)
    clreg_queue_size: int = 0             # earlier retain rows kept as extra negatives; 0 = none
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
                   "clreg_fallback": ("one_concept", "skip"),
                   "clreg_negatives": CLREG_NEGATIVES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (isinstance(self.clreg_queue_size, bool) or not isinstance(self.clreg_queue_size, int)
                or self.clreg_queue_size < 0):
            raise ValueError(f"clreg_queue_size must be an int >= 0, got {self.clreg_queue_size!r}")
        if self.clreg_queue_size and self.clreg_backend == "reference":
            raise ValueError("clreg_queue_size > 0 needs a fused clreg_backend ('auto', 'torch', "
                             "'triton' or 'cuda'); the reference backend takes no extra negatives")
        if self.clreg_queue_size and not self.clreg_weight > 0:
            # Not an error (a config may turn CLReg off and keep the rest), but say it is unused.
            warnings.warn("clreg_queue_size is set but clreg_weight is 0: no CLReg term, so no "
                          "queue is kept", stacklevel=3)
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



# --------------------------------------------------------------------------- data

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


def _check_examples(name: str, examples) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"{name} must be a non-empty list of examples")
    for i, ex in enumerate(examples[:8]):
        if not isinstance(ex, dict) or "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"{name}[{i}] must be a dict with input_ids and labels")
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"{name}[{i}] has {len(ex['input_ids'])} input_ids but "
                             f"{len(ex['labels'])} labels")


def _nll_tokens(example: dict) -> int:
    """Answer tokens the (shifted) NLL of one example scores."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def _normalizers(forget_tokens: List[int], retain_tokens: List[int], forget_idx: List[int],
                 retain_idx: List[int], micro: int) -> Dict[str, float]:
    """Counts over the whole optimizer step (all ranks, all accumulation steps)."""
    return {
        "forget_tokens": float(max(sum(forget_tokens[i] for i in forget_idx), 1)),
        "retain_tokens": float(max(sum(retain_tokens[i] for i in retain_idx), 1)),
        "forget_seqs": float(len(forget_idx)),
        "retain_seqs": float(len(retain_idx)),
        "micro_batches": float(micro),
    }


def _batch(examples: Sequence[dict], ids: List[int], pad_id: int, device) -> Dict[str, torch.Tensor]:
    batch = collate([examples[i] for i in ids], pad_id)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------- the objective

def _autocast(enabled: bool, device: torch.device):
    if not enabled:  # also switches off an autocast region opened around this one
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


class _Objective(nn.Module):
    """The model, the optional CLReg projection head and the loss of one micro-batch.

    DDP and FSDP wrap this module (not the bare model), so one wrapped forward computes every
    term of a micro-batch, the projection head is synchronized with the model, and early-stopped
    feature forwards end inside it.
    """

    def __init__(self, model: nn.Module, cfg: UnlearnConfig, head: Optional[nn.Linear],
                 clreg_layer: int, rmu_layer: int, control: Optional[torch.Tensor],
                 use_autocast: bool, clreg_group=None):
        super().__init__()
        self.model = model
        self.head = head
        self.cfg = cfg
        self.clreg_layer = clreg_layer
        self.rmu_layer = rmu_layer
        self._control = control  # a plain attribute: not a parameter, not in the state dict
        self.use_autocast = use_autocast
        self.clreg_group = clreg_group  # "global" CLReg: the process group of the loss

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

    def _rmu_terms(self, forget, retain, norms, ref):
        """RMU's terms from early-stopped forwards; (forget, retain, forget hidden, retain
        hidden for CLReg or None)."""
        cfg, cl = self.cfg, self.clreg_layer
        use_clreg = cfg.clreg_weight > 0
        retain_feats_from_model = use_clreg and cfg.clreg_retain_source == "model"
        _, f_hidden = self._run(forget, sorted({self.rmu_layer} | ({cl} if use_clreg else set())),
                                want_logits=False)
        _, r_hidden = self._run(retain, sorted({self.rmu_layer} | ({cl} if retain_feats_from_model
                                                                   else set())),
                                want_logits=False)
        forget_term = M.masked_token_mse(f_hidden[self.rmu_layer], self._control,
                                         answer_mask(forget["labels"]), norms["forget_seqs"])
        retain_term = M.masked_token_mse(r_hidden[self.rmu_layer], ref["rmu_retain_hidden"],
                                         answer_mask(retain["labels"]), norms["retain_seqs"])
        retain_for_clreg = r_hidden[cl] if retain_feats_from_model else None
        return forget_term, retain_term, f_hidden, retain_for_clreg

    def _logit_terms(self, forget, retain, norms, ref, logs):
        """GradAscent/GradDiff/NPO/SimNPO terms from the logits; same return as _rmu_terms."""
        cfg, cl = self.cfg, self.clreg_layer
        use_clreg = cfg.clreg_weight > 0
        retain_feats_from_model = use_clreg and cfg.clreg_retain_source == "model"
        f_logits, f_hidden = self._run(forget, [cl] if use_clreg else [], want_logits=True)
        nll_sum, n_tok = M.sequence_nll(f_logits, forget["labels"])
        if cfg.method in ("gradascent", "graddiff"):
            forget_term = -nll_sum.sum() / norms["forget_tokens"]
        elif cfg.method == "npo":
            forget_term = M.npo_loss(nll_sum, ref["forget_nll"], cfg.npo_beta, norms["forget_seqs"])
        else:
            forget_term = M.simnpo_loss(nll_sum, n_tok, cfg.simnpo_beta, cfg.simnpo_delta,
                                        norms["forget_seqs"])
        logs["forget_nll"] = (nll_sum.sum() / norms["forget_tokens"]).detach()
        retain_term, r_hidden = None, {}
        if M.USES_RETAIN_LOSS[cfg.method]:
            r_logits, r_hidden = self._run(retain, [cl] if retain_feats_from_model else [],
                                           want_logits=True)
            retain_term = M.sequence_nll(r_logits, retain["labels"])[0].sum() \
                / norms["retain_tokens"]
        elif retain_feats_from_model:
            with torch.no_grad():  # features only: stop after the CLReg layer
                _, r_hidden = self._run(retain, [cl], want_logits=False)
        retain_for_clreg = r_hidden[cl] if retain_feats_from_model else None
        return forget_term, retain_term, f_hidden, retain_for_clreg

    def _clreg(self, forget_hidden, forget, retain_hidden, retain, extra_negatives):
        """(loss, info, this batch's retain rows projected for the queue, or None)."""
        cfg = self.cfg
        f_feats, f_labels = pool_features(forget_hidden, answer_mask(forget["labels"]),
                                          cfg.clreg_pooling, forget["concept_ids"],
                                          cfg.clreg_label_by)
        if self.clreg_group is not None and cfg.clreg_label_by == "sequence":
            # Sequence ids must be global: rank r holds sequences r*B .. r*B + B - 1 of the
            # union (every rank's micro-batch has B sequences), as in one process.
            f_labels = f_labels + dist.get_rank(self.clreg_group) * forget["input_ids"].shape[0]
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
                                  backend=cfg.clreg_backend, extra_negatives=extra_negatives,
                                  process_group=self.clreg_group)
        if loss is None:
            loss = f_feats.sum() * 0.0
        if self.head is not None:
            # Keeps the head in the graph when the term is skipped, so DDP/FSDP see its grads.
            loss = loss + sum(p.sum() * 0.0 for p in self.head.parameters())
        queue_rows = None
        if cfg.clreg_queue_size:
            # Projected here, where the head is whole (FSDP unshards it for the forward only).
            with torch.no_grad():
                if r_feats is None:
                    width = weight.shape[0] if weight is not None else f_feats.shape[1]
                    queue_rows = f_feats.new_zeros((0, width))
                else:
                    queue_rows = (torch.nn.functional.linear(r_feats, weight, bias)
                                  if weight is not None else r_feats).detach()
        return loss, info, queue_rows

    def forward(self, forget, retain, norms: Dict[str, float], ref: Dict[str, torch.Tensor],
                extra_negatives: Optional[torch.Tensor] = None):
        """(loss, logs, retain rows for the queue or None) of one micro-batch."""
        cfg = self.cfg
        device = forget["input_ids"].device
        logs: Dict[str, torch.Tensor] = {}
        queue_rows = None
        with _autocast(self.use_autocast, device):
            if cfg.method == "rmu":
                forget_term, retain_term, f_hidden, r_hidden = self._rmu_terms(
                    forget, retain, norms, ref)
            else:
                forget_term, retain_term, f_hidden, r_hidden = self._logit_terms(
                    forget, retain, norms, ref, logs)

        loss = cfg.gamma * forget_term
        logs["forget_loss"] = forget_term.detach()
        if retain_term is not None:
            loss = loss + cfg.retain_weight * retain_term
            logs["retain_loss"] = retain_term.detach()
        if cfg.clreg_weight > 0:
            if r_hidden is None:  # retain features from the frozen reference, if any
                r_hidden = ref.get("clreg_retain_hidden")
            # CLReg in its own precision (autocast would push the similarity GEMMs to bf16).
            with _autocast(False, device):
                clreg, info, queue_rows = self._clreg(f_hidden[self.clreg_layer], forget,
                                                      r_hidden, retain, extra_negatives)
            # "local": the mean over every micro-batch of the step. "global": each rank adds
            # 1/world of the (same) global loss, which after the loop's world-size scale and
            # DDP's averaging gives the mean over accumulation steps.
            clreg = clreg / norms["micro_batches"]
            loss = loss + cfg.clreg_weight * clreg
            logs["clreg_loss"] = clreg.detach()
            for key, value in info.items():
                logs[key] = torch.tensor(value / norms["micro_batches"], device=loss.device)
        logs["loss"] = loss.detach()
        return loss, logs, queue_rows


class _FrozenReference(nn.Module):
    """The frozen reference model: NLL sums and/or early-stopped layer features, no grad."""

    def __init__(self, model: nn.Module, use_autocast: bool):
        super().__init__()
        self.model = model
        self.use_autocast = use_autocast

    @torch.no_grad()
    def forward(self, batch, layers: Tuple[int, ...], want_nll: bool):
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False)
        with _autocast(self.use_autocast, batch["input_ids"].device):
            if not layers:
                return M.sequence_nll(self.model(**kwargs).logits, batch["labels"])[0], {}
            with capture_layer(self.model, layers, stop=not want_nll) as cap:
                out = cap.run(**kwargs)
                hidden = {layer: cap[layer] for layer in layers}
            nll = M.sequence_nll(out.logits, batch["labels"])[0] if want_nll else None
        return nll, hidden


def _reference_inputs(reference, cfg: UnlearnConfig, forget, retain, f_ids, ref_forget_nll,
                      rmu_layer: int, clreg_layer: int) -> Dict[str, torch.Tensor]:
    """What the objective needs from the frozen reference for one micro-batch."""
    ref: Dict[str, torch.Tensor] = {}
    if cfg.method == "npo":
        if ref_forget_nll is not None:
            ref["forget_nll"] = ref_forget_nll[f_ids].to(forget["input_ids"].device)
        else:
            ref["forget_nll"] = reference(forget, (), True)[0]
    clreg_from_ref = cfg.clreg_weight > 0 and cfg.clreg_retain_source == "ref"
    layers = ({rmu_layer} if cfg.method == "rmu" else set()) | ({clreg_layer} if clreg_from_ref
                                                              else set())
    if layers:
        _, hidden = reference(retain, tuple(sorted(layers)), False)
        if cfg.method == "rmu":
            ref["rmu_retain_hidden"] = hidden[rmu_layer]
        if clreg_from_ref:
            ref["clreg_retain_hidden"] = hidden[clreg_layer]
    return ref


def _precompute_ref_nll(reference, examples, micro_bs: int, pad_id: int, device, d: DistInfo,
                        progress: bool) -> torch.Tensor:
    """Reference NLL sums of every forget example, computed once; ranks split the work."""
    from tqdm.auto import tqdm

    n = len(examples)
    mine = list(range(d.rank, n, d.world))
    n_batches = math.ceil(math.ceil(n / d.world) / micro_bs)  # equal on every rank: FSDP lockstep
    out = torch.zeros(n, dtype=torch.float32, device=device)
    for b in tqdm(range(n_batches), desc="reference log-probs", leave=False,
                  disable=not progress or d.rank != 0):
        ids = mine[b * micro_bs:(b + 1) * micro_bs]
        real = len(ids)
        ids = ids + [0] * (micro_bs - real)  # dummy rows keep every rank's batch count equal
        nll, _ = reference(_batch(examples, ids, pad_id, device), (), True)
        if real:
            out[torch.as_tensor(ids[:real], device=device)] = nll[:real].float()
    d.all_reduce_sum(out)
    return out.cpu()


# --------------------------------------------------------------------------- model setup

def _pick_device(cfg: UnlearnConfig, d: DistInfo) -> torch.device:
    """cfg.device, else CUDA when there is one (this rank's GPU), else the CPU."""
    if cfg.device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(cfg.device if cfg.device is not None else "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    return device


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


@contextlib.contextmanager
def _model_state_restored(model: nn.Module, grad_checkpointing: bool):
    """On exit: checkpointing off again, and the requires_grad flags, train/eval mode and
    ``config.use_cache`` the model had on entry."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        yield
    finally:
        if grad_checkpointing:
            for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
                if hasattr(model, name):
                    getattr(model, name)()
                    break
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        model.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


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


def _make_head(cfg: UnlearnConfig, hidden_size: int, resume_from: Optional[str],
               device) -> Optional[nn.Linear]:
    """The trainable CLReg projection head (``clreg_proj_dim``), the same on every rank."""
    if not (cfg.clreg_weight > 0 and cfg.clreg_proj_dim):
        return None
    head = nn.Linear(hidden_size, cfg.clreg_proj_dim)
    generator = torch.Generator().manual_seed(cfg.seed + 17)
    bound = 1.0 / math.sqrt(hidden_size)  # nn.Linear's default init, seeded
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    if resume_from:
        checkpoint.load_head(head, resume_from)
    return head.to(device)


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
    for p in module.parameters():
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


def _run_eval(eval_fn, model: nn.Module, objective: nn.Module, parallel: str) -> Dict[str, float]:
    model.eval()
    try:
        with torch.no_grad(), full_params(objective, parallel):
            results = eval_fn(model) or {}
    finally:
        model.train()

    def plain(value):  # numbers (and 0-d tensors) become floats; anything else stays as is
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
        return float(value) if isinstance(value, (int, float)) else value

    return {f"eval_{k}": plain(v) for k, v in results.items()}


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
        (before alpha), ``clreg_loss`` (before clreg_weight; the mean over the step's contrastive
        batches), ``clreg_fallback`` and ``clreg_skipped`` (fractions of those batches:
        micro-batches, or accumulation steps with ``clreg_negatives="global"``), ``grad_norm``
        (before clipping), and ``eval_<name>`` on eval steps. Values are over the global batch (reduced over ranks).

    The global torch RNG is reseeded with ``seed + rank`` (dropout streams).
    """
    from tqdm.auto import tqdm

    cfg = cfg if cfg is not None else UnlearnConfig()
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"cfg must be an UnlearnConfig, got {type(cfg).__name__}")
    _check_examples("forget_examples", forget_examples)
    _check_examples("retain_examples", retain_examples)
    forget_examples, retain_examples = list(forget_examples), list(retain_examples)
    # A process group created here stays up: under FSDP the returned model is sharded and
    # needs it. Call torch.distributed.destroy_process_group() when done (the CLI does).
    d = init_distributed(cfg.parallel)
    # "global" CLReg: the loss's (and the queue's) process group, apart from DDP's buckets.
    clreg_group = side_group(d) if cfg.clreg_weight > 0 and cfg.clreg_negatives == "global" \
        else None

    # Each step's forget and retain indices are cut into world * grad_accum micro-batches.
    micro = d.world * cfg.grad_accum
    retain_bs = cfg.retain_batch_size or cfg.batch_size
    for name, size in (("batch_size", cfg.batch_size), ("retain_batch_size", retain_bs)):
        if size % micro:
            raise ValueError(f"{name}={size} must be divisible by world_size * grad_accum = "
                             f"{d.world} * {cfg.grad_accum}")
    f_mb, r_mb = cfg.batch_size // micro, retain_bs // micro
    total_steps = cfg.max_steps if cfg.max_steps is not None else \
        math.ceil(cfg.epochs * len(forget_examples) / cfg.batch_size)

    device = _pick_device(cfg, d)
    if device.type == "cuda":
        # NCCL collectives, FSDP2's default device and the CUDA RNG state saved in checkpoints
        # all follow the current device, also when the caller made the process group.
        torch.cuda.set_device(device)
    use_bf16 = (cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda"
                                     and torch.cuda.is_bf16_supported()))
    use_autocast = use_bf16 and cfg.parallel != "fsdp"  # FSDP2 casts by its policy instead
    resume_from = checkpoint.resume_dir(cfg.resume, cfg.out_dir)  # before touching the model

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

    with _model_state_restored(model, cfg.grad_checkpointing):
        # -- the model, the objective around it, and the frozen reference
        if resume_from:
            checkpoint.load_model_weights(model, resume_from)
        if cfg.parallel != "fsdp":
            # fully_shard moves each block to the device as it shards it, so under FSDP a
            # model loaded on the CPU never sits whole on one GPU.
            model.to(device)
        model.train()
        if cfg.method == "rmu":
            _freeze_for_rmu(model, cfg, rmu_layer)
        if cfg.grad_checkpointing:
            _enable_checkpointing(model)
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False  # no KV cache in training forwards
        control = (M.rmu_control_vector(hidden_size, cfg.rmu_steering, cfg.seed, device)
                   if cfg.method == "rmu" else None)
        objective = _Objective(model, cfg, _make_head(cfg, hidden_size, resume_from, device),
                               clreg_layer, rmu_layer, control, use_autocast, clreg_group)
        queue = None
        if cfg.clreg_weight > 0 and cfg.clreg_queue_size:
            from clreg_fast.distributed import RetainFeatureQueue

            # Outside the wrapped module: DDP would re-broadcast its buffer, FSDP shard it.
            queue = RetainFeatureQueue(cfg.clreg_queue_size, cfg.clreg_proj_dim or hidden_size,
                                       process_group=clreg_group, device=device)
        reference = None
        if needs_ref:
            if cfg.parallel != "fsdp":
                ref_model.to(device)
            ref_model.eval()
            ref_model.requires_grad_(False)
            reference = _FrozenReference(ref_model, use_autocast)
        wrapped = wrap(objective, reference, cfg.parallel, device, use_bf16,
                       cfg.ddp_find_unused_parameters)

        # -- optimizer, schedule, samplers; then the state of a resumed run
        optimizer = _make_optimizer(objective, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, cfg, total_steps))
        params = [p for p in objective.parameters() if p.requires_grad]
        forget_tokens = [_nll_tokens(ex) for ex in forget_examples]
        retain_tokens = [_nll_tokens(ex) for ex in retain_examples]
        streams = {"forget_stream": IndexStream(len(forget_examples), cfg.seed, salt=1),
                   "retain_stream": IndexStream(len(retain_examples), cfg.seed, salt=2)}
        torch.manual_seed(cfg.seed + d.rank)  # dropout etc.; differs across ranks on purpose
        history: List[Dict[str, float]] = []
        start_step = 0
        if resume_from:
            history, start_step = checkpoint.load_trainer_state(
                resume_from, objective, optimizer, scheduler, streams, cfg.parallel == "fsdp", d,
                queue=queue)

        ref_forget_nll = None
        if cfg.method == "npo" and cfg.cache_ref:
            ref_forget_nll = _precompute_ref_nll(reference, forget_examples, f_mb, pad_id, device,
                                                 d, cfg.progress)

        log = MetricsLog(cfg.out_dir if d.rank == 0 else None, history, cfg.to_dict())
        bar = tqdm(total=total_steps, initial=start_step, desc=f"unlearn[{cfg.method}]",
                   disable=not cfg.progress or d.rank != 0, dynamic_ncols=True)
        for step in range(start_step, total_steps):
            forget_idx = streams["forget_stream"].take(cfg.batch_size)
            retain_idx = streams["retain_stream"].take(retain_bs)
            norms = _normalizers(forget_tokens, retain_tokens, forget_idx, retain_idx, micro)
            lr = optimizer.param_groups[0]["lr"]
            log_sums: Dict[str, torch.Tensor] = {}
            for a in range(cfg.grad_accum):
                m = a * d.world + d.rank  # this rank's micro-batch of accumulation step a
                f_ids = forget_idx[m * f_mb:(m + 1) * f_mb]
                r_ids = retain_idx[m * r_mb:(m + 1) * r_mb]
                forget = _batch(forget_examples, f_ids, pad_id, device)
                retain = _batch(retain_examples, r_ids, pad_id, device)
                ref = _reference_inputs(reference, cfg, forget, retain, f_ids, ref_forget_nll,
                                        rmu_layer, clreg_layer)
                # Gradients are reduced over ranks in the last accumulation step only.
                last = a == cfg.grad_accum - 1
                sync = contextlib.nullcontext()
                if cfg.parallel == "ddp" and not last:
                    sync = wrapped.no_sync()
                elif cfg.parallel == "fsdp":
                    objective.set_requires_gradient_sync(last)
                extra = queue.negatives() if queue is not None else None
                with sync:
                    loss, logs, queue_rows = wrapped(forget, retain, norms, ref, extra)
                    # DDP/FSDP average gradients over ranks; the loss is already normalized
                    # by global counts, so scale by world size to get the gradient of the sum.
                    (loss * d.world).backward()
                if queue is not None:  # after the backward: negatives come from earlier batches
                    queue.enqueue(queue_rows)
                for key, value in logs.items():
                    log_sums[key] = log_sums.get(key, 0.0) + value.detach().float()
            grad_norm = _clip_and_norm(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            record = {"step": done, "epoch": streams["forget_stream"].epochs_done, "lr": lr,
                      **reduce_logs(log_sums, d, device), "grad_norm": grad_norm}
            if eval_fn is not None and cfg.eval_every and (done % cfg.eval_every == 0
                                                           or done == total_steps):
                record.update(_run_eval(eval_fn, model, objective, cfg.parallel))
            log.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if cfg.out_dir and cfg.save_every and done % cfg.save_every == 0:
                checkpoint.save_checkpoint(os.path.join(cfg.out_dir, f"checkpoint-{done}"), model,
                                           objective, optimizer, scheduler, streams, history,
                                           done, cfg, d, queue=queue)
                log.write_csv()
        bar.close()
        if cfg.out_dir and cfg.save_final:
            checkpoint.save_final(os.path.join(cfg.out_dir, "final"), model, objective, cfg, d)
        log.write_csv()
        if clreg_group is not None:
            dist.destroy_process_group(clreg_group)
        return history

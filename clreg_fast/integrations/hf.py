"""CLReg for ``transformers.Trainer``-based unlearning methods (e.g. OpenUnlearning).

Put :class:`CLRegMixin` first among the bases of an existing trainer::

    class CLRegNPO(CLRegMixin, NPO):
        pass

    trainer = CLRegNPO(model=model, args=args, train_dataset=data, data_collator=collator,
                       clreg_weight=1.0, clreg_layer=-1, clreg_pooling="mean", clreg_proj_dim=256,
                       **npo_kwargs)

The base trainer's ``compute_loss(model, inputs)`` receives ``inputs["forget"]`` and
``inputs["retain"]`` (dicts with ``input_ids``, ``attention_mask``, ``labels``; prompt tokens at
-100) and runs its own forwards of the trained model. The mixin records the output of decoder
layer ``clreg_layer`` during those forwards (no extra forward pass), pools it over the answer
tokens and adds ``clreg_weight * fused_clreg_loss(forget, retain.detach(), head, labels=concepts)``
to the base loss. ``clreg_loss`` is logged with the Trainer's own logs.

Which forwards count: only forwards of the trained model itself (the module the Trainer passes
to ``compute_loss``, unwrapped from DDP/DeepSpeed), run with gradients enabled, whose
``input_ids`` are the forget (or retain) batch; the first such forward of each batch wins.
Forwards of a reference model (another module), no-grad forwards of the trained model (a
reference computed with adapters disabled, generation) and repeated forwards are not used.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn

from clreg_fast.backends import BACKENDS
from clreg_fast.unlearn.data import answer_mask
from clreg_fast.unlearn.features import (POOLINGS, capture_layer, layer_hidden_states,
                                         pool_features, resolve_layer)
from clreg_fast.unlearn.methods import clreg_term

logger = logging.getLogger(__name__)

HEAD_NAME = "clreg_head"  # the head is registered on the model under this name
# A PEFT checkpoint keeps adapter weights only: the head is saved beside it under this name.
HEAD_FILE = "clreg_head.safetensors"
FALLBACKS = ("one_concept", "skip")
NEGATIVES = ("local", "global")
# Each DataParallel replica forwards a slice of the batch (in its own thread), so no forward is
# the forget batch's and the hooks would race: refused with what to do instead.
_DATA_PARALLEL = ("CLRegMixin does not support nn.DataParallel, which the Trainer uses when one "
                  "process sees several GPUs: run one process per GPU (torchrun or accelerate "
                  "launch) or make one GPU visible (CUDA_VISIBLE_DEVICES=0)")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose forward the wrappers call (DDP/DeepSpeed ``.module``, compile)."""
    root = model
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(root, attr, None), nn.Module):
            root = getattr(root, attr)
    return root


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _same_batch(x, ref: Optional[torch.Tensor]) -> bool:
    if ref is None or not isinstance(x, torch.Tensor):
        return False
    if x is ref:
        return True
    return x.shape == ref.shape and x.device == ref.device and bool(torch.equal(x, ref))


def _is_peft_model(model) -> bool:
    """Whether the model's checkpoints hold the adapter weights only: a PEFT ``PeftModel``, or
    a transformers model given adapters by ``add_adapter``/``load_adapter`` (its
    ``save_pretrained`` then writes the adapter alone too)."""
    model = _unwrap(model)
    if getattr(model, "_hf_peft_config_loaded", False) is True:
        return True
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _fsdp_version(trainer) -> Optional[int]:
    """1 or 2 when the Trainer runs FSDP (accelerate's plugin), None otherwise."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None),
                     "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def _zero3_enabled() -> bool:
    try:  # the import path moved between transformers versions
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        try:
            from transformers.deepspeed import is_deepspeed_zero3_enabled
        except ImportError:
            return False
    return bool(is_deepspeed_zero3_enabled())


class _ForwardCapture:
    """Hooks on the trained model: which root forward is the forget/retain one, and its features.

    A forward pre-hook on the model's root decides whether this forward is the first
    gradient-enabled forward of the forget (or retain) batch; the decoder-layer hook of
    :func:`capture_layer` records the layer output, which the root's forward hook then keeps.
    """

    def __init__(self, model: nn.Module, layer: int, batches: Dict[str, torch.Tensor]):
        self.model = model
        self.layer = layer
        self.batches = batches                # slot name -> input_ids of that batch
        self.hidden: Dict[str, torch.Tensor] = {}
        self._active: Optional[str] = None
        self._cap = capture_layer(model, layer)
        self._handles = []

    def _pre(self, _module, args, kwargs):
        self._active = None
        if not torch.is_grad_enabled():
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        for slot, ids in self.batches.items():
            if slot not in self.hidden and _same_batch(input_ids, ids):
                self._active = slot
                self._cap.features.clear()
                break
        return None

    def _post(self, _module, _args, _output):
        if self._active is not None and self.layer in self._cap.features:
            self.hidden[self._active] = self._cap.features[self.layer]
        self._active = None
        return None

    def __enter__(self) -> "_ForwardCapture":
        self._cap.__enter__()
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cap.__exit__(*exc)
        return False


class CLRegMixin:
    """Adds the CLReg term to a ``transformers.Trainer`` subclass's ``compute_loss``.

    Keyword arguments (every other argument goes to the base trainer unchanged):

    Args:
        clreg_weight: multiplier of the CLReg term (>= 0). ``0`` makes the mixin a pass-through:
            no hooks, no head, nothing logged, the base trainer's update bit for bit.
        clreg_layer: decoder layer whose output is the feature; negative counts from the last.
        clreg_temperature: tau of the loss (> 0).
        clreg_pooling: ``"mean"`` or ``"last"`` over the answer tokens (labels != -100), or
            ``"token"`` (one row per answer token, labelled by its sequence's concept).
        clreg_proj_dim: ``None`` (no projection) or the output size of a trainable
            ``nn.Linear(hidden_size, clreg_proj_dim)`` head. The head is registered on the model
            as ``model.clreg_head``, so the Trainer's optimizer, DDP/ZeRO/FSDP2 and checkpoints
            (and resume) include it; ``from_pretrained`` of a saved model ignores the extra key
            with a warning. A PEFT model's checkpoints keep it in ``clreg_head.safetensors``
            beside the adapter. It is called as a module (never read by the loss directly), so
            engines that shard it gather it as any layer. float32, except under ZeRO-3 and FSDP
            (one dtype per flat buffer): there the model's dtype.
        clreg_backend: ``fused_clreg_loss`` backend (``"auto"``, ``"torch"``, ``"triton"``, ...).
        clreg_concept_key: key of a (B,) integer tensor of concept ids in ``inputs["forget"]``
            (forget rows of one concept are positives); absent from the batch: one concept. The
            key is removed before the base trainer sees the batch.
        clreg_fallback: when no concept repeats in a micro-batch, ``"one_concept"`` treats all
            forget rows as one concept and ``"skip"`` drops the term for that micro-batch.
        clreg_negatives: ``"local"``: the contrastive batch is this rank's micro-batch;
            ``"global"``: the micro-batches of every rank together (``fused_clreg_loss`` with
            ``process_group``, exact gradients; one process: the same as local). Concept ids
            must then be global (equal ids on two ranks are one concept).

    Unsupported: ``nn.DataParallel`` (several GPUs in one process; raises
    ``NotImplementedError``), a projection head under FSDP1 (raises ``NotImplementedError``
    naming FSDP2, ZeRO-3 and DDP, which work), and inputs given as ``inputs_embeds``. Gradient
    checkpointing works, reentrant or not: the hooks are removed before backward, so
    recomputation neither records nor counts.
    """

    def __init__(self, *args, clreg_weight: float = 1.0, clreg_layer: int = -1,
                 clreg_temperature: float = 0.1, clreg_pooling: str = "mean",
                 clreg_proj_dim: Optional[int] = None, clreg_backend: str = "auto",
                 clreg_concept_key: Optional[str] = "concept_ids",
                 clreg_fallback: str = "one_concept", clreg_negatives: str = "local",
                 **kwargs):
        _check_args(clreg_weight, clreg_layer, clreg_temperature, clreg_pooling, clreg_proj_dim,
                    clreg_backend, clreg_concept_key, clreg_fallback, clreg_negatives)
        self.clreg_weight = float(clreg_weight)
        self.clreg_layer = clreg_layer
        self.clreg_temperature = float(clreg_temperature)
        self.clreg_pooling = clreg_pooling
        self.clreg_proj_dim = clreg_proj_dim
        self.clreg_backend = clreg_backend
        self.clreg_concept_key = clreg_concept_key
        self.clreg_fallback = clreg_fallback
        self.clreg_negatives = clreg_negatives
        self._clreg_head_anchor: Optional[torch.Tensor] = None
        self._clreg_log_sum: Optional[torch.Tensor] = None
        self._clreg_log_count = 0
        super().__init__(*args, **kwargs)
        if self.clreg_weight == 0:
            return
        model = getattr(self, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError("CLRegMixin needs the trainer to be given a model (model_init is "
                             "not supported)")
        resolve_layer(model, clreg_layer)  # a clear error now rather than at the first step
        args_ = getattr(self, "args", None)
        if getattr(args_, "n_gpu", 1) > 1:  # the Trainer will wrap the model in DataParallel
            raise NotImplementedError(_DATA_PARALLEL)
        if (clreg_pooling != "token" and args_ is not None
                and getattr(args_, "per_device_train_batch_size", 2) < 2):
            raise ValueError("CLReg needs at least 2 forget rows per micro-batch: "
                             "per_device_train_batch_size must be >= 2 with "
                             f"clreg_pooling={clreg_pooling!r} (or use clreg_pooling='token')")
        if clreg_proj_dim is not None:
            self._add_head(model)

    # ------------------------------------------------------------------------------ the head

    def _add_head(self, model: nn.Module) -> None:
        fsdp_version = _fsdp_version(self)
        if fsdp_version == 1:
            raise NotImplementedError(
                "clreg_proj_dim under FSDP1 is not supported: FSDP1 flattens the head's "
                "parameters into one shard that only the root's forward gathers. Use FSDP2 "
                "(fsdp_version: 2 in the accelerate config / fsdp_config), DeepSpeed ZeRO-3 or "
                "DDP, or clreg_proj_dim=None (the loss then reads only activations)")
        sharded = fsdp_version is not None or _zero3_enabled()
        args = getattr(self, "args", None)
        if args is not None and hasattr(args, "ddp_find_unused_parameters"):
            # The head is used after the model's forwards, never inside one: DDP's search for
            # unused parameters would mark it ready at each forward and again in backward.
            if args.ddp_find_unused_parameters:
                raise ValueError("clreg_proj_dim needs ddp_find_unused_parameters=False (or "
                                 "unset): DDP would take the head, used outside the model's "
                                 "forward, for an unused parameter")
            args.ddp_find_unused_parameters = False
        # The Trainer built its accelerator (and DDP's arguments) before the head existed.
        handler = getattr(getattr(self, "accelerator", None), "ddp_handler", None)
        if handler is not None:
            handler.find_unused_parameters = False
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            embedding = _unwrap(model).get_input_embeddings().weight
            hidden = tuple(getattr(embedding, "ds_shape", embedding.shape))[1]  # ZeRO-3: a shard
        if hasattr(model, HEAD_NAME):
            raise ValueError(f"the model already has an attribute {HEAD_NAME!r}")
        # Seeded like nn.Linear's default init, so every rank starts from the same head; the
        # global RNG is left as it was (it drives dropout and, in some versions, data order).
        with torch.random.fork_rng(devices=[]):
            head = nn.Linear(hidden, self.clreg_proj_dim)
        seed = int(getattr(getattr(self, "args", None), "seed", 0)) + 17
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden)
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        first = next(model.parameters())
        # float32 whatever the model's dtype (pooled rows are few), except where an engine
        # flattens the model's parameters into buffers of one dtype (ZeRO-3, FSDP): there the
        # model's dtype. The projected rows are cast to float32 for the loss either way.
        dtype = first.dtype if sharded and first.dtype.is_floating_point else torch.float32
        model.add_module(HEAD_NAME, head.to(device=first.device, dtype=dtype))

    @property
    def clreg_head(self) -> Optional[nn.Linear]:
        """The trainable projection head, or None."""
        model = getattr(self, "model", None)
        return getattr(_unwrap(model), HEAD_NAME, None) if model is not None else None

    # ------------------------------------------------------------- PEFT checkpoints

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        result = super()._save(output_dir, state_dict=state_dict)
        head = self.clreg_head
        # Some ranks that do not save still run _save (transformers 5, a model loaded sharded:
        # they join its gathers); only the saving rank writes the file.
        should_save = getattr(getattr(self, "args", None), "should_save", True)
        if head is not None and should_save and _is_peft_model(self.model):
            from safetensors.torch import save_file

            # Under ZeRO-3 the head holds only this rank's partition; the Trainer then passes
            # the gathered state dict, whose copy of the head is the full one.
            tensors = {name: (state_dict or {}).get(f"{HEAD_NAME}.{name}", value)
                       for name, value in head.state_dict().items()}
            if any(t.numel() == 0 for t in tensors.values()):
                logger.warning("CLRegMixin: the head is partitioned and no gathered copy was "
                               "given to _save: %s not written", HEAD_FILE)
                return result
            directory = output_dir if output_dir is not None else self.args.output_dir
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(directory, HEAD_FILE))
        return result

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        result = super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, HEAD_FILE)
        head = self.clreg_head
        if head is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            head.load_state_dict(load_file(path, device=str(head.weight.device)))
        return result

    # --------------------------------------------------------------------------- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None,
                     **kwargs):
        base = super().compute_loss
        if _accepts(base, "num_items_in_batch"):
            kwargs["num_items_in_batch"] = num_items_in_batch
        is_unlearn_batch = isinstance(inputs, Mapping) and isinstance(inputs.get("forget"),
                                                                      Mapping)
        concept_ids = None
        if is_unlearn_batch:
            forget = dict(inputs["forget"])  # a copy: the caller's batch is left as it was
            concept_ids = self.clreg_concept_ids(forget)
            inputs = {**inputs, "forget": forget}
        if (self.clreg_weight == 0 or not is_unlearn_batch or not model.training
                or not torch.is_grad_enabled()):
            return base(model, inputs, return_outputs=return_outputs, **kwargs)

        if isinstance(model, nn.DataParallel):
            raise NotImplementedError(_DATA_PARALLEL)
        forget = inputs["forget"]
        retain = inputs.get("retain") if isinstance(inputs.get("retain"), Mapping) else None
        target = _unwrap(model)
        layer = resolve_layer(target, self.clreg_layer)
        batches = {"forget": forget["input_ids"]}
        if retain is not None:
            batches["retain"] = retain["input_ids"]
        with _ForwardCapture(target, layer, batches) as capture:
            result = base(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = (result if return_outputs else (result, None))

        forget_hidden = capture.hidden.get("forget")
        if forget_hidden is None:
            raise RuntimeError(
                "CLRegMixin: the base trainer's compute_loss did not forward the trained model "
                "on inputs['forget']['input_ids'] with gradients enabled, so there are no forget "
                "features to regularize (a forward is recognized by input_ids equal to the "
                "batch's; inputs_embeds or a sliced batch are not)")
        if not forget_hidden.requires_grad and any(p.requires_grad for p in target.parameters()):
            raise RuntimeError(
                f"CLRegMixin: the features of decoder layer {layer} carry no gradient: every "
                "parameter up to that layer seems frozen; pick a layer the method trains as "
                "clreg_layer")
        retain_hidden = capture.hidden.get("retain")
        if retain_hidden is None and retain is not None:
            # The base never forwarded the retain batch (e.g. GradAscent): one no-grad forward
            # that stops right after the feature layer. Retain features are detached anyway.
            if not getattr(self, "_clreg_said_retain_forward", False):
                logger.info("CLRegMixin: the base trainer does not forward inputs['retain']; "
                            "one no-grad forward up to layer %d gives the retain features", layer)
                self._clreg_said_retain_forward = True
            with torch.no_grad():
                retain_hidden = layer_hidden_states(model, retain["input_ids"],
                                                    retain["attention_mask"], layer)
        self._check_retain_rows_differ(retain)
        clreg = self._clreg_term(forget_hidden, forget, concept_ids, retain_hidden, retain)
        if clreg is not None:
            self._record_clreg(clreg)
            scale = self.clreg_weight * self._ga_correction(num_items_in_batch)
            # With device_map="auto" the term (on the head's device) and the method's loss
            # (on the last layer's) may live on different devices.
            loss = loss + scale * clreg.to(device=loss.device, dtype=loss.dtype)
        elif self._clreg_head_anchor is not None:
            # A dropped term still keeps the head's call in the graph, so its backward (DDP's
            # reducer, ZeRO-3's and FSDP's gradient reduction) runs on every rank.
            loss = loss + self._clreg_head_anchor.to(device=loss.device, dtype=loss.dtype)
        self._clreg_head_anchor = None
        return (loss, outputs) if return_outputs else loss

    def clreg_concept_ids(self, forget: Dict) -> Optional[torch.Tensor]:
        """(B,) integer concept ids of the forget rows, or None for one concept.

        ``forget`` is this step's copy of ``inputs["forget"]``, the one the base trainer will
        see: the default pops ``clreg_concept_key`` from it. Override to derive concepts from
        other fields (e.g. ``forget["index"] // 20`` when the forget set lists 20 questions per
        person); then leave fields the base trainer reads in place.
        """
        if self.clreg_concept_key is None:
            return None
        return forget.pop(self.clreg_concept_key, None)

    def _clreg_term(self, forget_hidden: torch.Tensor, forget: Mapping,
                    concept_ids: Optional[torch.Tensor], retain_hidden: Optional[torch.Tensor],
                    retain: Optional[Mapping]) -> Optional[torch.Tensor]:
        """The (unweighted) CLReg loss of one micro-batch from the captured (B, T, D) states.

        Returns None when the term is dropped for this micro-batch: fewer than two forget rows
        (e.g. "token" pooling over short answers), or no repeated concept with
        ``clreg_fallback="skip"``.
        """
        head = self.clreg_head
        # The head's device: under device_map="auto" the feature layer may sit elsewhere.
        device = head.weight.device if head is not None else forget_hidden.device
        f_feats, f_labels = pool_features(forget_hidden, answer_mask(forget["labels"]),
                                          self.clreg_pooling, concept_ids)
        r_feats = None
        if retain_hidden is not None:
            r_feats, _ = pool_features(retain_hidden.detach(), answer_mask(retain["labels"]),
                                       self.clreg_pooling)
        if head is not None:
            # The head is called as a module, once, on every rank and every micro-batch, even
            # when the term is then dropped: ZeRO-3 and FSDP gather its parameters in that call
            # and reduce their gradient in its backward, collectives every rank must run alike.
            rows = f_feats if r_feats is None else torch.cat([f_feats, r_feats])
            projected = head(rows.to(device=device, dtype=head.weight.dtype)).float()
            self._clreg_head_anchor = projected.sum() * 0.0  # used if the term is dropped
            f_feats, r_feats = (projected, None) if r_feats is None else (
                projected[: f_feats.shape[0]], projected[f_feats.shape[0]:])
        else:
            f_feats = f_feats.to(device=device, dtype=torch.float32)
            if r_feats is not None:
                r_feats = r_feats.to(device=device, dtype=torch.float32)
        if concept_ids is None:
            f_labels = None  # one concept: no label bookkeeping (and no host sync) needed
        else:
            f_labels = f_labels.to(device)
        loss, _info = clreg_term(f_feats, f_labels, r_feats, None, None,
                                 temperature=self.clreg_temperature,
                                 fallback=self.clreg_fallback, backend=self.clreg_backend,
                                 process_group=self._clreg_process_group())
        return loss

    def _check_retain_rows_differ(self, retain: Optional[Mapping]) -> None:
        """With global negatives, warns once when every rank got the same retain rows.

        OpenUnlearning's dataset draws the retain rows with the global RNG, seeded alike on every
        rank (its issue #139): the global batch then holds each retain row world_size times, so
        each counts world_size times among the negatives. One all-gather of a digest, once.
        """
        group = self._clreg_process_group()
        if group is None or getattr(self, "_clreg_checked_retain", False):
            return
        self._clreg_checked_retain = True
        import hashlib

        import torch.distributed as dist

        digest = None if retain is None else hashlib.sha1(
            retain["input_ids"].detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        digests = [None] * dist.get_world_size(group)
        dist.all_gather_object(digests, digest, group=group)
        if digest is not None and len(set(digests)) == 1:
            logger.warning(
                "CLRegMixin: every rank got the same retain rows (OpenUnlearning draws them with "
                "an RNG seeded alike on every rank, its issue #139): with "
                "clreg_negatives='global' each retain row counts %d times among the negatives. "
                "Seed the retain draw per rank, or use clreg_negatives='local'",
                len(digests))

    def _clreg_process_group(self):
        """For ``clreg_negatives="global"`` with several ranks, a group of every rank of the
        CLReg term's own, else None. Its own, so that the loss's collectives never interleave
        with the engine's gradient collectives on the default group (DDP buckets, ZeRO
        reductions). Made on first use, which every rank reaches at the same step."""
        if self.clreg_negatives != "global":
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        if getattr(self, "_clreg_group", None) is None:
            self._clreg_group = dist.new_group()
        return self._clreg_group

    def _ga_correction(self, num_items_in_batch) -> float:
        """1, or 1 / accumulation steps when the Trainer will not divide the loss by them.

        The CLReg term is a per-micro-batch mean. The Trainer divides the returned loss by the
        number of accumulation steps unless it believes the loss is already normalized over the
        accumulated batch (a ``num_items_in_batch``-aware model, ``compute_loss_func``, or
        ``loss_is_scaled_for_ga``); then the term is divided here instead.
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(self, "model_accepts_loss_kwargs", False)
                       and num_items_in_batch is not None)
                      or getattr(self, "compute_loss_func", None) is not None)
        if not scaled:
            return 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        if not isinstance(steps, int) or steps < 1:
            steps = getattr(getattr(self, "args", None), "gradient_accumulation_steps", 1)
        return 1.0 / steps

    # ------------------------------------------------------------------------------ logging

    def _record_clreg(self, clreg: torch.Tensor) -> None:
        value = clreg.detach().float()
        # Summed on the device; read back only when the Trainer logs (no per-step sync).
        self._clreg_log_sum = value if self._clreg_log_sum is None else self._clreg_log_sum + value
        self._clreg_log_count += 1

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """Adds ``clreg_loss`` (mean over the micro-batches since the last log, over ranks)."""
        if self.clreg_weight != 0 and "loss" in logs:
            value = self._clreg_log_sum
            device = value.device if value is not None else getattr(self.args, "device", "cpu")
            totals = torch.stack([
                value if value is not None else torch.zeros((), device=device),
                torch.tensor(float(self._clreg_log_count), device=device)])
            accelerator = getattr(self, "accelerator", None)
            if accelerator is not None and accelerator.num_processes > 1:
                # Every rank logs training steps, so this collective is reached on each.
                totals = accelerator.reduce(totals, reduction="sum")
            if float(totals[1]) > 0:
                logs = {**logs, "clreg_loss": float(totals[0] / totals[1])}
            self._clreg_log_sum = None
            self._clreg_log_count = 0
        return super().log(logs, *args, **kwargs)


def _check_args(weight, layer, temperature, pooling, proj_dim, backend, concept_key, fallback,
                negatives):
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"clreg_weight must be a finite number >= 0, got {weight!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"clreg_layer must be an int, got {type(layer).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"clreg_temperature must be a finite number > 0, got {temperature!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"clreg_pooling must be one of {POOLINGS}, got {pooling!r}")
    if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int)
                                 or proj_dim < 1):
        raise ValueError(f"clreg_proj_dim must be None or an int >= 1, got {proj_dim!r}")
    if not isinstance(backend, str):
        raise TypeError(f"clreg_backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"clreg_backend must be one of {BACKENDS}, got {backend!r}")
    if concept_key is not None and not isinstance(concept_key, str):
        raise TypeError("clreg_concept_key must be a str or None, got "
                        f"{type(concept_key).__name__}")
    if fallback not in FALLBACKS:
        raise ValueError(f"clreg_fallback must be one of {FALLBACKS}, got {fallback!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"clreg_negatives must be one of {NEGATIVES}, got {negatives!r}")


__all__ = ["CLRegMixin", "HEAD_NAME"]

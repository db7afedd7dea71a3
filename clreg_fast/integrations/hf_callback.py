"""Representation metrics during training, for any ``transformers.Trainer``.

:class:`RepresentationMetricsCallback` forwards a fixed probe set of forget and retain rows
through the trained model at chosen steps, pools one decoder layer's output per row and logs
:mod:`clreg_fast.metrics` values (Entanglement Score, kNN mixing, silhouette, linear-probe
accuracy, forget/retain cosine, retain drift) through the Trainer's own ``log``, so they land in
``trainer.state.log_history`` and in every reporting callback (TensorBoard, W&B, ...)::

    trainer = CLRegNPO(model=model, args=args, ...)        # or any Trainer, e.g. OpenUnlearning's
    RepresentationMetricsCallback(forget_probe, retain_probe, layer=-1).attach(trainer)
    trainer.train()       # log_history gets {"repr/knn_mixing": ..., ..., "step": s}

``attach`` keeps a (weak) reference to the trainer, whose ``log`` the callback calls, and adds
the callback to it: a plain callback cannot emit log entries of its own, and one added to the
logs of another event would come after the reporting callbacks had already written them.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

try:  # the callback base class; without transformers the class still imports (tests, docs)
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is an optional dependency
    TrainerCallback = object

from clreg_fast.metrics.representation import METRIC_NAMES, representation_metrics
from clreg_fast.unlearn.features import capture_layer, pool_features, resolve_layer

IGNORE_INDEX = -100
WHEN = ("log", "evaluate")
POOLINGS = ("mean", "last")

Probe = Union[Mapping, Sequence[Mapping]]


def _row_tensor(value, name: str, row: int) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1:
        raise ValueError(f"row {row}: {name} must be 1-D (one row), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.is_complex() or (t.dtype == torch.bool
                                                         and name == "input_ids"):
        raise TypeError(f"row {row}: {name} must hold integers, got {t.dtype}")
    return t.long()


def _probe_rows(probe: Probe, name: str) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, pool_mask)`` per row of a probe set.

    The pooled tokens are the answer tokens (``labels != -100``) when the probe has labels,
    otherwise every attended token (``attention_mask == 1``, or every token without a mask).
    """
    if isinstance(probe, Mapping):
        if "input_ids" not in probe:
            raise ValueError(f"{name} probe: a batch needs 'input_ids'")
        ids = probe["input_ids"]
        # A padded batch (tensor/array) or a list of rows of any lengths, e.g. a tokenizer's
        # output without padding; each row's own checks come below.
        if hasattr(ids, "shape") and len(ids.shape) != 2:
            raise ValueError(f"{name} probe: input_ids must be (rows, tokens), got shape "
                             f"{tuple(ids.shape)}")
        if not hasattr(ids, "shape") and (not isinstance(ids, Sequence)
                                          or isinstance(ids, (str, bytes))):
            raise TypeError(f"{name} probe: input_ids must be a (rows, tokens) tensor or a "
                            f"list of rows, got {type(ids).__name__}")
        rows = [{key: probe[key][i] for key in ("input_ids", "attention_mask", "labels")
                 if probe.get(key) is not None} for i in range(len(ids))]
    elif isinstance(probe, Sequence) and not isinstance(probe, (str, bytes)):
        rows = list(probe)
    elif hasattr(probe, "__len__") and hasattr(probe, "__getitem__") and not isinstance(
            probe, (str, bytes)):  # indexable row collections, e.g. a datasets.Dataset
        rows = [probe[i] for i in range(len(probe))]
    else:
        raise TypeError(f"{name} probe must be a batch dict or a list of row dicts, got "
                        f"{type(probe).__name__}")
    if not rows:
        raise ValueError(f"{name} probe has no rows")
    with_labels = [isinstance(row, Mapping) and row.get("labels") is not None for row in rows]
    if any(with_labels) and not all(with_labels):
        raise ValueError(f"{name} probe: either every row has labels or none has")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "input_ids" not in row:
            raise TypeError(f"{name} probe row {i} must be a dict with 'input_ids'")
        ids = _row_tensor(row["input_ids"], "input_ids", i)
        mask = row.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else _row_tensor(mask, "attention_mask", i)
        if mask.shape != ids.shape:
            raise ValueError(f"{name} probe row {i}: attention_mask and input_ids differ in "
                             f"length ({mask.numel()} vs {ids.numel()})")
        if with_labels[i]:
            labels = _row_tensor(row["labels"], "labels", i)
            if labels.shape != ids.shape:
                raise ValueError(f"{name} probe row {i}: labels and input_ids differ in length")
            pool = (labels != IGNORE_INDEX) & (mask != 0)
        else:
            pool = mask != 0
        if not bool(pool.any()):
            raise ValueError(f"{name} probe row {i} has no token to pool (no answer token "
                             "with labels != -100, or no attended token)")
        out.append((ids, mask, pool))
    return out


def _collate(rows, pad_token_id: int):
    width = max(ids.numel() for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pool = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row_ids, row_mask, row_pool) in enumerate(rows):
        n = row_ids.numel()
        ids[i, :n], mask[i, :n], pool[i, :n] = row_ids, row_mask, row_pool
    return ids, mask, pool


class _EvalMode:
    """Every submodule in eval mode inside the block, each back to its own mode after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: List[Tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
        return False


class RepresentationMetricsCallback(TrainerCallback):
    """Logs representation metrics of a fixed forget/retain probe set during training.

    Args:
        forget, retain: the probe sets, each either a tokenized batch (a dict of (rows, tokens)
            ``input_ids``, optional ``attention_mask`` and ``labels``; tensors or nested lists,
            whose rows may differ in length as a tokenizer's unpadded output does)
            or a list of row dicts with the same keys (1-D each, any lengths; any indexable
            collection of such rows, e.g. a ``datasets.Dataset``, works too). Rows are
            forwarded as given, right-padded with ``pad_token_id`` to the micro-batch's longest
            row. With ``labels`` (-100 on prompt tokens, as in training batches) the pooled
            tokens are the answer tokens, otherwise every attended token.
        layer: decoder layer whose output is the feature (negative counts from the last), as
            ``CLRegMixin``'s ``clreg_layer``: for the last layer, before the final norm.
        pooling: ``"mean"`` over the pooled tokens or the ``"last"`` of them, per row.
        when: ``"log"`` (every step the Trainer logs the training loss, ``logging_steps``),
            ``"evaluate"`` (every evaluation step, ``eval_steps``/``eval_strategy``, and any
            ``trainer.evaluate()`` call at a step not yet measured), or both (a tuple).
            One measurement per step at most.
        metrics: names from :data:`clreg_fast.metrics.METRIC_NAMES`; ``retain_drift`` compares
            the retain features with those of the model at ``on_train_begin``.
        k: neighbours of ``knn_mixing`` (at most ``Nf - 1 + Nr``).
        batch_size: probe rows per forward.
        prefix: prepended to each metric name in the logs (``"repr/knn_mixing"``).
        at_train_begin: also log the metrics of the model before the first step (at its step,
            0 unless resumed).
        seed: seed of the linear probe's folds.

    Each measurement runs under ``torch.no_grad()`` with every submodule in eval mode (each
    restored to its own mode after), inside the trainer's ``compute_loss_context_manager``
    (its autocast), on ``args.device``. It forwards ``trainer.model`` as the Trainer passes it
    to callbacks: the model itself under DDP and DeepSpeed (hooks on its decoder layer), the
    FSDP-wrapped model under FSDP. Distributed runs: every rank measures, on the full probe set,
    at the same steps (DeepSpeed ZeRO-3 and FSDP gather parameters collectively, so one rank
    cannot forward alone; DDP ranks hold equal weights, so every rank gets the same numbers);
    ``Trainer.log`` then reports them from the main process only, as it does the loss.
    """

    def __init__(self, forget: Probe, retain: Probe, *, layer: int = -1, pooling: str = "mean",
                 when: Union[str, Iterable[str]] = "log", metrics: Sequence[str] = METRIC_NAMES,
                 k: int = 5, batch_size: int = 16, pad_token_id: int = 0,
                 prefix: str = "repr/", at_train_begin: bool = True, seed: int = 0):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        when = (when,) if isinstance(when, str) else tuple(when)
        if not when or any(w not in WHEN for w in when):
            raise ValueError(f"when must be 'log', 'evaluate' or both, got {when!r}")
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = sorted(set(metrics) - set(METRIC_NAMES))
        if unknown or not metrics:
            raise ValueError(f"metrics must name some of {METRIC_NAMES}, got {metrics!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.forget_rows = _probe_rows(forget, "forget")
        self.retain_rows = _probe_rows(retain, "retain")
        pool = len(self.forget_rows) - 1 + len(self.retain_rows)
        if "knn_mixing" in metrics and (isinstance(k, bool) or not isinstance(k, int)
                                        or not 1 <= k <= pool):
            raise ValueError(f"k must be an int in [1, {pool}] for these probe sets (forget "
                             f"rows - 1 + retain rows), got {k!r}")
        self.layer, self.pooling, self.when, self.metrics = layer, pooling, when, metrics
        self.k, self.batch_size, self.pad_token_id = k, batch_size, int(pad_token_id)
        self.prefix, self.at_train_begin, self.seed = prefix, bool(at_train_begin), seed
        self.reference_retain: Optional[torch.Tensor] = None
        self._trainer_ref = None
        self._measured_step: Optional[int] = None

    # ------------------------------------------------------------------------- wiring

    def attach(self, trainer) -> "RepresentationMetricsCallback":
        """Binds the callback to ``trainer`` (whose ``log`` it calls) and adds it there."""
        if not hasattr(trainer, "callback_handler") or not callable(getattr(trainer, "log", None)):
            raise TypeError(f"attach needs a transformers.Trainer, got {type(trainer).__name__}")
        model = getattr(trainer, "model", None)
        if isinstance(model, nn.Module):
            resolve_layer(model, self.layer)  # a clear error now rather than at the first log
        self._trainer_ref = weakref.ref(trainer)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _trainer(self):
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            raise RuntimeError("RepresentationMetricsCallback is not attached to a trainer: "
                               "call callback.attach(trainer) (it also adds the callback) "
                               "instead of passing it in callbacks=[...]")
        return trainer

    # ------------------------------------------------------------------------- measuring

    @torch.no_grad()
    def features(self, model: nn.Module, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(forget, retain) float32 pooled features of ``model`` on the probe sets."""
        if device is None:
            device = next(model.parameters()).device
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        context = getattr(trainer, "compute_loss_context_manager", None)
        out = []
        with _EvalMode(model):
            for rows in (self.forget_rows, self.retain_rows):
                parts = []
                for start in range(0, len(rows), self.batch_size):
                    ids, mask, pool = _collate(rows[start:start + self.batch_size],
                                               self.pad_token_id)
                    with (context() if callable(context) else contextlib.nullcontext()), \
                            capture_layer(model, self.layer) as cap:
                        cap.run(input_ids=ids.to(device), attention_mask=mask.to(device),
                                use_cache=False)
                        hidden = cap[self.layer]
                    feats, _ = pool_features(hidden.float(), pool.to(hidden.device),
                                             self.pooling)
                    parts.append(feats)
                out.append(torch.cat(parts))
        return out[0], out[1]

    def compute(self, model: nn.Module, device=None, features=None) -> Dict[str, float]:
        """The metrics of ``model`` now, keyed by their names (without the prefix);
        ``features``: its (forget, retain) features if already computed."""
        forget, retain = self.features(model, device) if features is None else features
        return representation_metrics(forget, retain, self.reference_retain, k=self.k,
                                      names=self.metrics, seed=self.seed)

    def _measure_and_log(self, args, state, control, model, features=None) -> None:
        trainer = self._trainer()
        model = model if isinstance(model, nn.Module) else trainer.model
        values = self.compute(model, getattr(args, "device", None), features)
        self._measured_step = state.global_step
        should_log = control.should_log
        # Trainer.log appends to log_history and runs every callback's on_log (the reporters
        # too); its handler also clears should_log, which still has to fire this step's loss log.
        trainer.log({self.prefix + name: value for name, value in values.items()})
        control.should_log = should_log

    def _due(self, state, control) -> bool:
        if self._measured_step == state.global_step:
            return False
        return (("log" in self.when and control.should_log)
                or ("evaluate" in self.when and control.should_evaluate))

    # ------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer()
        model = model if isinstance(model, nn.Module) else trainer.model
        self._measured_step = None
        features = None
        if "retain_drift" in self.metrics:
            # One forward of the probe sets serves as the drift reference and, with
            # at_train_begin, as the first measurement.
            features = self.features(model, getattr(args, "device", None))
            self.reference_retain = features[1]
        if self.at_train_begin:
            self._measure_and_log(args, state, control, model, features)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # DefaultFlowCallback (first in the handler) has set should_log/should_evaluate.
        if self._due(state, control):
            self._measure_and_log(args, state, control, model)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self._due(state, control):  # epoch logging/evaluation strategies
            self._measure_and_log(args, state, control, model)
        return control

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if "evaluate" in self.when and self._measured_step != state.global_step:
            self._measure_and_log(args, state, control, model)  # a trainer.evaluate() call
        return control


__all__ = ["RepresentationMetricsCallback"]

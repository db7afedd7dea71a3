"""Input checks shared by every entry point: bad input fails here, before any kernel runs."""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from clreg_fast.backends.base import NORM_EPS
from clreg_fast.loss_math import LabelGroups, group_labels

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but forget has {ref.dtype}; use one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but forget is on {ref.device}")


_SHARDED_FIX = ("call the projection module on the features and pass its output with "
                "weight=None (CLRegLoss and CLRegMixin do so), so that the engine gathers the "
                "parameter for the call and routes its gradient")


def _is_dtensor(t) -> bool:
    # No DTensor can exist before its module is imported: no import here then. torch < 2.5
    # keeps the class in torch.distributed._tensor only.
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(module), "DTensor", None)
        if dtensor is not None and isinstance(t, dtensor):
            return True
    return False


def shard_kind(t) -> Optional[str]:
    """How an engine shards ``t`` outside its module's forward: ``"dtensor"`` (FSDP2, tensor
    parallelism), ``"zero3"`` (a DeepSpeed ZeRO-3 parameter), ``"empty"`` (an empty 1-D view: a
    ZeRO-3 or FSDP1 shard), or None for a tensor held whole."""
    if not isinstance(t, torch.Tensor):
        return None
    if _is_dtensor(t):
        return "dtensor"
    if hasattr(t, "ds_id") or hasattr(t, "ds_status"):
        return "zero3"
    if t.dim() == 1 and t.numel() == 0:
        return "empty"
    return None


def check_not_sharded(name: str, t) -> None:
    """Refuses a projection parameter that holds only this rank's shard.

    A fused loss that reads a sharded parameter directly computes with the shard (an empty
    tensor under ZeRO-3, a slice under FSDP) or with a gathered copy whose gradient the engine
    never reduces: a wrong number or a crash far from the cause. The fix is the engine's own
    path: calling the module that owns the parameter.
    """
    kind = shard_kind(t)
    if kind == "dtensor":
        raise TypeError(f"{name} is a DTensor (a parameter sharded by FSDP2 fully_shard or "
                        f"tensor parallelism), which the fused loss cannot read: {_SHARDED_FIX}")
    if kind == "zero3":
        raise TypeError(
            f"{name} is a DeepSpeed ZeRO-3 parameter (ds_status="
            f"{getattr(t, 'ds_status', '?')}, local numel {t.numel()}, full shape "
            f"{tuple(getattr(t, 'ds_shape', ()))}): the fused loss would read this rank's "
            f"partition, or a gathered copy that is re-partitioned before backward: "
            f"{_SHARDED_FIX}")
    if kind == "empty" and name == "weight":
        raise ValueError(
            "weight is an empty 1-D tensor: a parameter sharded by FSDP1 or DeepSpeed ZeRO-3 "
            f"read outside its module's forward: {_SHARDED_FIX}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a module's float
    # attribute is a symbolic float, which comparisons can guard on (NaN fails both).
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_features(forget, retain, weight, bias) -> None:
    """Shapes, dtypes and devices of the feature tensors and the projection."""
    _check_tensor("forget", forget, 2)
    if forget.dtype not in FLOAT_DTYPES:
        raise TypeError(f"forget must be a floating tensor (fp16, bf16, fp32, fp64), got {forget.dtype}")
    d = forget.shape[1]
    if d == 0:
        raise ValueError("forget has feature size 0")
    if retain is not None:
        _check_tensor("retain", retain, 2)
        if retain.shape[1] != d:
            raise ValueError(
                f"retain has feature size {retain.shape[1]} but forget has {d}; they must match"
            )
        _check_like("retain", retain, forget)
    check_not_sharded("weight", weight)
    check_not_sharded("bias", bias)
    if weight is not None:
        _check_tensor("weight", weight, 2)
        if weight.shape[1] != d:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}; expected (P, {d}) "
                "(nn.Linear convention: out_features x in_features)"
            )
        if weight.shape[0] == 0:
            raise ValueError("weight has 0 output features")
        _check_like("weight", weight, forget)
    if bias is not None:
        if weight is None:
            raise ValueError("bias was given without weight; a bias needs a projection")
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},) to match weight"
            )
        _check_like("bias", bias, forget)


def check_labels(labels, nf: int, device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    _check_tensor("labels", labels, 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != nf:
        raise ValueError(f"labels has {labels.shape[0]} entries but forget has {nf} rows")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but forget is on {device}")
    return labels


def label_groups(labels: Optional[torch.Tensor]) -> Optional[LabelGroups]:
    """Concept groups of ``labels`` (None: one concept, no grouping needed).

    In eager mode this raises if no forget row has a positive, which reads one number on the
    host. Under ``torch.compile`` that check is left out (a host sync would break the graph):
    the loss of such a batch is then NaN for ``reduction="mean"`` (0 anchors), 0 for "sum" and
    all zeros for "none", and every gradient is 0 (no anchor, no gradient).
    """
    if labels is None:
        return None
    groups = group_labels(labels)
    if torch.compiler.is_compiling():
        return groups
    # One host read gives both the check and the number of anchors (used to skip the rows
    # without a positive in the kernels).
    largest, n_anchors = (int(v) for v in torch.stack(
        [groups.row_count.max(), (groups.row_count > 1).sum()]).tolist())
    if largest < 2:
        raise ValueError(
            "no forget row has a positive: every label occurs once, so the loss is undefined; "
            "give at least two forget rows the same label"
        )
    return groups._replace(n_anchors=n_anchors)


def check_extra_negatives(extra_negatives, forget, weight) -> Optional[torch.Tensor]:
    """Extra negative columns as the kernels take them: detached, normalized, float32 (float64).

    Rows of a feature queue are normalized already; normalizing again is a no-op up to rounding
    and guarantees the ``s <= 1`` bound the kernels' fixed-shift exponentials rely on.
    """
    if extra_negatives is None:
        return None
    if not isinstance(extra_negatives, torch.Tensor):
        raise TypeError("extra_negatives must be a torch.Tensor, got "
                        f"{type(extra_negatives).__name__}")
    width = weight.shape[0] if weight is not None else forget.shape[1]
    if extra_negatives.dim() != 2 or extra_negatives.shape[1] != width:
        raise ValueError(
            f"extra_negatives must have shape (M, {width}) (rows in the projected space), got "
            f"{tuple(extra_negatives.shape)}"
        )
    if not extra_negatives.dtype.is_floating_point:
        raise TypeError(f"extra_negatives must be a floating tensor, got {extra_negatives.dtype}")
    if extra_negatives.device != forget.device:
        raise ValueError(f"extra_negatives is on {extra_negatives.device} but forget is on "
                         f"{forget.device}")
    compute = torch.float64 if forget.dtype == torch.float64 else torch.float32
    return F.normalize(extra_negatives.detach().to(compute), dim=1, eps=NORM_EPS)


def check_inputs(forget, retain, weight, bias, labels, temperature,
                 reduction) -> Optional[LabelGroups]:
    """Every check of the spec's inputs; returns the label groups the loss needs."""
    check_features(forget, retain, weight, bias)
    nf = forget.shape[0]
    if nf < 2:
        raise ValueError(f"forget needs at least 2 rows (an anchor and a positive), got {nf}")
    check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    labels = check_labels(labels, nf, forget.device)
    return label_groups(labels)

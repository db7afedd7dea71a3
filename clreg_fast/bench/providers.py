"""The loss implementations being compared, and the inputs they are measured on."""
from __future__ import annotations

import math
import shutil
from typing import Callable, Dict, Optional, Tuple

import torch

from clreg_fast.bench.config import DEFAULT_NUM_LABELS, FUSED, PROVIDERS, BenchConfig

LossFn = Callable[[Dict[str, Optional[torch.Tensor]]], torch.Tensor]


def make_inputs(config: BenchConfig, device: torch.device, seed: int = 0
                ) -> Dict[str, Optional[torch.Tensor]]:
    """Random (never zero) features and a trainable projection head on ``device``.

    ``forget``, ``weight`` and ``bias`` require grad; ``retain`` does unless
    ``config.retain_detached``. Labels cycle through DEFAULT_NUM_LABELS concepts when enabled.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = config.torch_dtype

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale)

    forget = randn(config.nf, config.d).requires_grad_(True)
    retain = randn(config.nr, config.d).requires_grad_(not config.retain_detached)
    weight = bias = None
    if config.p is not None:
        weight = randn(config.p, config.d, scale=1.0 / math.sqrt(config.d)).requires_grad_(True)
        bias = randn(config.p, scale=0.01).requires_grad_(True)
    labels = None
    if config.labels:
        labels = torch.arange(config.nf, device=device) % DEFAULT_NUM_LABELS
    return {"forget": forget, "retain": retain, "weight": weight, "bias": bias, "labels": labels}


def tensor_bytes(inputs: Dict[str, Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)


def clear_grads(inputs: Dict[str, Optional[torch.Tensor]]) -> None:
    for t in inputs.values():
        if t is not None and t.grad is not None:
            t.grad = None


def availability(provider: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``provider`` can be measured on ``device``, and why not."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if provider in ("compile", "compile_native"):
        if not hasattr(torch, "compile"):
            return False, "this torch has no torch.compile"
        if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")
                                         or shutil.which("clang++")):
            return False, "torch.compile on CPU needs a C++ compiler (g++)"
        return True, ""
    if provider == "supcon":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return False, ("pytorch-metric-learning is not installed (pip install "
                           "pytorch-metric-learning)")
        return True, ""
    if provider not in FUSED:
        return True, ""
    from clreg_fast import available_backends

    if provider == "triton" and device.type == "cpu":
        return False, "triton runs on CPU tensors only in its interpreter (too slow to benchmark)"
    if provider == "cuda" and device.type == "cpu":
        return False, "the cuda backend needs a GPU"
    if provider not in available_backends():
        return False, f"backend {provider!r} is not available here (available_backends() = " \
                      f"{available_backends()})"
    return True, ""


def _math_dtype(provider: str, config: BenchConfig) -> torch.dtype:
    """float32 math for the reference variants, the inputs' dtype for the *_native ones."""
    if provider.endswith("_native"):
        return config.torch_dtype
    return torch.float32


def make_loss_fn(provider: str, config: BenchConfig) -> LossFn:
    """A callable ``fn(inputs) -> scalar loss`` (reduction "mean") for ``provider``."""
    from clreg_fast import clreg_loss_reference, fused_clreg_loss
    from clreg_fast.reference import _reference_impl

    tau = config.temperature
    if provider == "reference":
        def fn(x):
            return clreg_loss_reference(x["forget"], x["retain"], x["weight"], x["bias"],
                                        labels=x["labels"], temperature=tau)
        return fn
    if provider in ("eager_native", "compile", "compile_native"):
        compute = _math_dtype(provider, config)

        def math_only(forget, retain, weight, bias, labels):
            # No input validation inside: it reads labels on the host, which breaks graphs.
            return _reference_impl(forget, retain, weight, bias, labels, tau, "mean", compute)

        if provider == "eager_native":
            return lambda x: math_only(x["forget"], x["retain"], x["weight"], x["bias"], x["labels"])
        # A fresh compilation per config: static shapes (the best case for the compiler), and no
        # stale cache entries from other shapes counting against dynamo's recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(math_only, dynamic=False)
        return lambda x: compiled(x["forget"], x["retain"], x["weight"], x["bias"], x["labels"])
    if provider == "supcon":
        return _supcon_loss_fn(tau)
    if provider in FUSED:
        def fn(x):
            return fused_clreg_loss(x["forget"], x["retain"], x["weight"], x["bias"],
                                    labels=x["labels"], temperature=tau, backend=provider)
        return fn
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _supcon_loss_fn(tau: float) -> LossFn:
    """pytorch-metric-learning's SupConLoss as a user would call it: float32 projected rows of
    forget and retain, retain rows given labels of their own (the spec's equivalence)."""
    import torch.nn.functional as F
    from pytorch_metric_learning.losses import SupConLoss

    loss_fn = SupConLoss(temperature=tau)

    def fn(x):
        forget, retain = x["forget"], x["retain"]
        nf = forget.shape[0]
        nr = retain.shape[0] if retain is not None else 0
        rows = forget if nr == 0 else torch.cat([forget, retain])
        rows = rows.float()
        if x["weight"] is not None:
            bias = x["bias"].float() if x["bias"] is not None else None
            rows = F.linear(rows, x["weight"].float(), bias)
        labels = x["labels"]
        labels = (labels.long() if labels is not None
                  else torch.zeros(nf, dtype=torch.long, device=forget.device))
        # Retain ids above every forget label: each retain row is a class of its own.
        retain_ids = labels.max() + 1 + torch.arange(nr, device=forget.device)
        return loss_fn(rows, torch.cat([labels, retain_ids]))
    return fn

"""pytest-benchmark micro-benchmarks of the CPU providers on tiny shapes.

pyproject's addopts pass ``--benchmark-disable``: each benchmarked function then runs once and
these act as smoke tests (the result is still checked against the reference). To time them:

    python -m pytest tests/test_microbench.py --benchmark-enable --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from clreg_fast import fused_clreg_loss
from clreg_fast.reference import _reference_impl
from clreg_fast.bench.config import BenchConfig
from clreg_fast.bench.providers import clear_grads, make_inputs, make_loss_fn

SHAPES = {
    "proj": BenchConfig(96, 80, 48, 16, "fp32"),
    "noproj-labels": BenchConfig(96, 80, 48, None, "fp32", labels=True),
    "proj-detached": BenchConfig(96, 80, 48, 16, "fp32", retain_detached=True),
}


def _float64_loss_and_grads(config: BenchConfig, inputs):
    """The same loss in float64 on detached copies: the yardstick for the benchmarked call."""
    copies = {k: (v.detach().double().requires_grad_(v.requires_grad)
                  if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    loss = _reference_impl(copies["forget"], copies["retain"], copies["weight"], copies["bias"],
                           copies["labels"], config.temperature, "mean",
                           compute_dtype=torch.float64)
    loss.backward()
    grads = {k: v.grad for k, v in copies.items() if v is not None and v.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_forward(benchmark, provider, shape):
    config = SHAPES[shape]
    inputs = make_inputs(config, torch.device("cpu"), seed=1)
    fn = make_loss_fn(provider, config)
    benchmark.group = f"forward {shape}"
    loss = benchmark(lambda: fn(inputs).detach())
    expected, _ = _float64_loss_and_grads(config, inputs)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_forward_backward(benchmark, provider, shape):
    config = SHAPES[shape]
    inputs = make_inputs(config, torch.device("cpu"), seed=2)
    fn = make_loss_fn(provider, config)

    def step():
        clear_grads(inputs)
        loss = fn(inputs)
        loss.backward()
        return loss.detach()

    benchmark.group = f"forward+backward {shape}"
    loss = benchmark(step)
    expected, grads = _float64_loss_and_grads(config, inputs)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(grads) == {k for k, v in inputs.items() if v is not None and v.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(inputs[name].grad.double(), grad, rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {name} ({provider}, {shape})")
    if config.retain_detached:
        assert inputs["retain"].grad is None


def test_backend_call_overhead(benchmark):
    """The fused entry on the smallest valid input: input checks and dispatch dominate."""
    forget = torch.randn(2, 8, requires_grad=True)
    retain = torch.randn(3, 8)
    loss = benchmark(lambda: fused_clreg_loss(forget, retain, backend="torch").detach())
    assert torch.isfinite(loss)

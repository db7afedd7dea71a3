"""Distributed CLReg: torchrun + gloo on CPU with 2 and 3 ranks, plus in-process checks.

The torchrun part launches ``tests/dist_scripts/dist_clreg_worker.py`` once per world size (all
cases in one launch, a few seconds each) and asserts on its per-case records: the loss equals the
single-process loss of the concatenated batch on every rank, each rank's feature gradients are
``world_size x`` the single-process ones, and DDP-averaged projection gradients equal the
single-process ones (see ``clreg_fast/distributed/loss.py`` for the convention).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clreg_fast import available_backends, fused_clreg_loss
from clreg_fast.backends import resolve_backend
from clreg_fast.reference import _reference_impl

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_scripts" / "dist_clreg_worker.py"
LAUNCH_TIMEOUT_S = 300  # a hang ends in the worker's 60 s gloo timeout long before this


def _worker_case_names():
    spec = importlib.util.spec_from_file_location("dist_clreg_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CASES)


CASE_NAMES = _worker_case_names()
_RUNS = {}


def _run_world(world: int):
    """All worker cases for one world size; launched once, shared by the tests of that size."""
    if world not in _RUNS:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", str(WORKER), "--out", str(out)]
            try:
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                      timeout=LAUNCH_TIMEOUT_S)
                if proc.returncode != 0 or not out.exists():
                    log = proc.stdout + proc.stderr
                    causes = [line for line in log.splitlines()
                              if any(k in line for k in ("Error", "terminate", "what()"))]
                    _RUNS[world] = (f"torchrun exited with {proc.returncode}; error lines:\n"
                                    + "\n".join(causes[:40]) + "\n--- log tail:\n" + log[-3000:])
                else:
                    _RUNS[world] = json.loads(out.read_text())
            except subprocess.TimeoutExpired as exc:
                _RUNS[world] = f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s: {exc}"
    result = _RUNS[world]
    if isinstance(result, str):
        pytest.fail(result)
    return result


# What every rank's error says, for the cases where all ranks see the same problem.
RAISED_MESSAGES = {
    "too_few_forget_rows": "at least 2 rows over all ranks",
    "no_positive": "no forget row has a positive",
    "temperature_differs": "ranks disagree on temperature",
    "labels_on_some_ranks_only": "ranks disagree on whether labels are given",
    "extra_differs": "extra_negatives differ across ranks",
    "local_queue_differs": "extra_negatives differ across ranks",
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_torchrun_case(case, world):
    record = _run_world(world)[case]
    if record["skipped"]:
        pytest.skip(record["skipped"])
    if case.startswith("raises_"):
        # Every rank must raise a ValueError (a hang would have hit the gloo timeout).
        assert all(r is not None and r.startswith("ValueError") for r in record["raised"]), \
            record["raised"]
        expected = RAISED_MESSAGES.get(case[len("raises_"):])
        if expected is not None:
            assert all(expected in r for r in record["raised"]), record["raised"]
        return
    assert all(r is None for r in record["raised"]), "\n".join(t for t in record["traceback"] if t)
    assert record["checks"], "the case checked nothing"
    failed = {name: v for name, v in record["checks"].items() if not v[0] <= v[1]}
    assert not failed, f"[error, tolerance] past tolerance: {failed}"


# ---------------------------------------------------------------------------------------------
# In-process checks (a one-rank gloo group): routing, errors, and the primitives' contract.

@pytest.fixture(scope="module")
def solo_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _inputs(seed=0, nf=7, nr=4, d=5, p=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    forget = torch.randn(nf, d, generator=gen, dtype=dtype, requires_grad=True)
    retain = torch.randn(nr, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(p, d, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(p, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3][:nf])
    return forget, retain, weight, bias, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_one_rank_group_matches_single_process(solo_group, reduction, backend):
    forget, retain, weight, bias, labels = _inputs()
    out = fused_clreg_loss(forget, retain, weight, bias, labels=labels, reduction=reduction,
                           backend=backend, process_group=solo_group)
    grads = torch.autograd.grad(out.sum(), [forget, retain, weight, bias])
    ref = _reference_impl(forget, retain, weight, bias, labels, 0.1, reduction, torch.float64)
    ref_grads = torch.autograd.grad(ref.sum(), [forget, retain, weight, bias])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_one_rank_group_errors_name_the_argument(solo_group):
    forget, retain, weight, bias, labels = _inputs()
    with pytest.raises(ValueError, match="at least 2 rows"):
        fused_clreg_loss(forget[:1], retain, process_group=solo_group)
    with pytest.raises(ValueError, match="no forget row has a positive"):
        fused_clreg_loss(forget, retain, labels=torch.arange(7), process_group=solo_group)
    with pytest.raises(ValueError, match="extra_negatives"):
        fused_clreg_loss(forget, retain, weight, bias, extra_negatives=torch.randn(2, 5,
                         dtype=torch.float64), process_group=solo_group)
    with pytest.raises(ValueError, match="extra_negatives needs a fused backend"):
        fused_clreg_loss(forget, retain, weight, bias, extra_negatives=torch.randn(2, 3,
                         dtype=torch.float64), backend="reference", process_group=solo_group)
    with pytest.raises(TypeError, match="temperature"):
        fused_clreg_loss(forget, retain, temperature="hot", process_group=solo_group)
    with pytest.raises(ValueError, match="reduction"):
        fused_clreg_loss(forget, retain, reduction="max", process_group=solo_group)
    with pytest.raises(ValueError, match="labels"):
        fused_clreg_loss(forget, retain, labels=labels[:3], process_group=solo_group)
    # The group is still usable after the errors (no rank left waiting in a collective).
    assert torch.isfinite(fused_clreg_loss(forget, retain, process_group=solo_group))


def test_one_rank_group_no_grad_and_float32(solo_group):
    forget, retain, weight, bias, labels = _inputs(dtype=torch.float32)
    with torch.no_grad():
        out = fused_clreg_loss(forget, retain, weight, bias, labels=labels,
                               process_group=solo_group)
    assert out.dtype == torch.float32 and not out.requires_grad
    ref = _reference_impl(forget, retain, weight, bias, labels, 0.1, "mean", torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=0)


# The distributed path calls the backend primitives with anchors and columns from different
# ranks: a negative self_offset (local columns, global anchors), an offset past every column
# (retain columns, no self pair), and partial chunks. Checked densely for every CPU backend.
def _dense_lse(za, zc, offset, scale):
    s = (za.double() @ zc.double().T) * scale
    rows = torch.arange(za.shape[0])
    cols = rows + offset
    keep = (cols >= 0) & (cols < zc.shape[0])
    s[rows[keep], cols[keep]] = float("-inf")
    return s


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("offset", [-5, -1, 0, 3, 9, 40])
def test_primitives_with_cross_rank_offsets(backend, offset, monkeypatch):
    from clreg_fast.backends.torch_chunked import ops

    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", {"cpu": 37})  # 1-2 rows: many partial chunks
    gen = torch.Generator().manual_seed(offset + 100)
    za = torch.nn.functional.normalize(torch.randn(11, 6, generator=gen), dim=1)
    zc = torch.nn.functional.normalize(torch.randn(9, 6, generator=gen), dim=1)
    w = torch.randn(11, generator=gen)
    kernels = resolve_backend(backend, za)
    scale = 1 / 0.2
    s = _dense_lse(za, zc, offset, scale)
    lse_ref = torch.logsumexp(s, dim=1)
    lse = kernels.lse_forward(za, zc, offset, scale)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    pr = torch.exp(s - lse_ref[:, None]) * w.double()[:, None] * scale
    dza, dzc = kernels.lse_backward(za, zc, lse, w, offset, scale, 7)
    torch.testing.assert_close(dza.double(), pr @ zc.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dzc.double(), (pr.T @ za.double())[:7], rtol=1e-5, atol=1e-5)


def test_int64_concept_ids_and_many_chunks(monkeypatch):
    """Concept ids above 2**31 and a column count that spans many chunks (single process)."""
    from clreg_fast.backends.torch_chunked import ops

    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", {"cpu": 1300})  # 8 rows per chunk, the last one partial
    gen = torch.Generator().manual_seed(5)
    forget = torch.randn(61, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    retain = torch.randn(100, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (61,), generator=gen) * (2 ** 33) + 2 ** 40
    out = fused_clreg_loss(forget, retain, labels=labels, backend="torch")
    grads = torch.autograd.grad(out, [forget, retain])
    ref = _reference_impl(forget, retain, None, None, labels, 0.1, "mean", torch.float64)
    ref_grads = torch.autograd.grad(ref, [forget, retain])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-14)


# The agreement check on extra_negatives: a checksum computed on the device and carried by the
# metadata all-gather, never read on its own (on a GPU that read would be a host sync per step).
def test_extra_negatives_checksum_is_not_read_on_the_host():
    from clreg_fast.distributed.loss import _EXTRA_ABS, _EXTRA_SUM, _M, _local_metadata

    # Meta tensors hold no data: any host read of the checksum (float(), .item()) raises.
    forget, extra = torch.empty(4, 3, device="meta"), torch.empty(5, 3, device="meta")
    meta = _local_metadata(forget, None, None, None, None, 0.1, "mean", "torch", extra, None,
                           torch.device("meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.float64
    # On CPU the vector holds the checksum itself.
    gen = torch.Generator().manual_seed(3)
    forget = torch.randn(4, 3, generator=gen)
    extra = torch.nn.functional.normalize(torch.randn(5, 3, generator=gen), dim=1)
    meta = _local_metadata(forget, None, None, None, None, 0.1, "mean", "torch", extra, None,
                           torch.device("cpu"))
    assert meta[_M] == 5
    torch.testing.assert_close(meta[_EXTRA_SUM], extra.double().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(meta[_EXTRA_ABS], extra.double().abs().sum(), rtol=1e-12, atol=0)


def test_agreement_check_catches_different_extra_negatives():
    from clreg_fast.distributed.loss import _check_agreement, _local_metadata

    gen = torch.Generator().manual_seed(4)
    forget = torch.randn(3, 3, generator=gen)
    shared = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen), dim=1)

    def rank_meta(extra):
        return _local_metadata(forget, None, None, None, None, 0.1, "mean", "torch", extra,
                               None, torch.device("cpu"))

    _check_agreement(torch.stack([rank_meta(shared), rank_meta(shared.clone())]))
    other = shared.clone()
    other[2] = torch.nn.functional.normalize(torch.randn(3, generator=gen), dim=0)
    with pytest.raises(ValueError, match="extra_negatives differ across ranks"):
        _check_agreement(torch.stack([rank_meta(shared), rank_meta(other)]))
    with pytest.raises(ValueError, match="number of extra_negatives rows"):
        _check_agreement(torch.stack([rank_meta(shared), rank_meta(shared[:5])]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_rank_group_with_extra_negatives_matches_single_process(solo_group, reduction):
    forget, retain, weight, bias, labels = _inputs()
    gen = torch.Generator().manual_seed(9)
    extra = torch.nn.functional.normalize(torch.randn(5, 3, generator=gen, dtype=torch.float64),
                                          dim=1)
    out = fused_clreg_loss(forget, retain, weight, bias, labels=labels, reduction=reduction,
                           backend="torch", extra_negatives=extra, process_group=solo_group)
    single = fused_clreg_loss(forget, retain, weight, bias, labels=labels, reduction=reduction,
                              backend="torch", extra_negatives=extra)
    torch.testing.assert_close(out, single, rtol=1e-12, atol=1e-14)

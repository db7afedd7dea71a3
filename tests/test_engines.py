"""CLReg under DeepSpeed ZeRO-2/3 and FSDP2: 2 gloo ranks on CPU against one process.

One ``torchrun`` launch per engine runs several cases (``tests/dist_scripts/engine_worker.py``)
to keep CI short. The cold ZeRO launch also compiles DeepSpeed's shared-memory op with g++ once
(about a minute; cached in ``~/.cache/torch_extensions``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from tests._torchrun import run_torchrun

from clreg_fast import fused_clreg_loss
from clreg_fast.modules import CLRegLoss, projection_is_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_scripts", "engine_worker.py")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_hf = pytest.mark.skipif(not (_has("transformers") and _has("accelerate")),
                              reason="needs transformers and accelerate")
needs_deepspeed = pytest.mark.skipif(not _has("deepspeed"), reason="needs deepspeed")


def _launch(tmp_path, engine: str, extra_env=None):
    results = run_torchrun(WORKER, ["--engine", engine, "--output-dir", tmp_path / "run"],
                           tmp_path / f"{engine}.pt", extra_env)
    failed = {k: v["exception"] for k, v in results.items() if "exception" in v}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    return results


def _deepspeed_env(tmp_path, stage: int):
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "zero_optimization": {"stage": stage},
              # a plain torch SGD, and no clipping, so the update is exactly -lr * gradient
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path),
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true" if stage == 3 else "false"}


def _check_first_update(case):
    """The engine's first update and logged loss are one process's on the same global batch."""
    assert case["same_names"]
    assert case["scale"] > 1e-3  # the update is not negligible: the test can fail
    assert case["error"] < 1e-5 * max(1.0, case["scale"]) + 2e-6, case
    assert case["logged_loss"] == pytest.approx(case["expected_loss"], rel=1e-5, abs=1e-6)


@needs_hf
@needs_deepspeed
@pytest.mark.slow
def test_zero3_head_no_head_dropped_term_and_clreg_loss(tmp_path):
    results = _launch(tmp_path, "zero3", _deepspeed_env(tmp_path, 3))
    for name in ("head", "no_head", "head_dropped_on_rank_1"):
        _check_first_update(results[name])
    assert results["head"]["head_dtype"] == "torch.float32"  # a float32 model's dtype
    # one rank dropped its term (no repeated concept, fallback "skip"), the other did not:
    # no collective desynchronized, and the update is the one-process one
    assert results["head_dropped_on_rank_1"]["dropped"] == [False, True]
    # CLRegLoss owning its projection, partitioned by deepspeed.initialize
    loss_case = results["clreg_loss"]
    assert loss_case["scale"] > 1e-3
    assert loss_case["error"] < 1e-6 and loss_case["loss_error"] < 1e-6
    assert "ZeRO-3" in loss_case["shard_error"] and "weight=None" in loss_case["shard_error"]


@needs_hf
@needs_deepspeed
@pytest.mark.slow
def test_zero2_head_and_global_negatives_make_the_update_independent_of_the_ranks(tmp_path):
    results = _launch(tmp_path, "zero2", _deepspeed_env(tmp_path, 2))
    local, global_ = results["head_local"], results["head_global"]
    _check_first_update(local)
    _check_first_update(global_)
    # 2 ranks x 4 rows with global negatives = 1 process x 8 rows (a per-sequence-mean method);
    # with local negatives each rank's contrastive batch is its 4 rows, and the update differs
    tolerance = 1e-5 * max(1.0, global_["scale"]) + 2e-6
    assert global_["error_vs_one_process_global_batch"] < tolerance
    assert local["error_vs_one_process_global_batch"] > 100 * tolerance


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch.distributed.fsdp"), reason="needs torch.distributed.fsdp")
def test_fsdp2_clreg_loss_one_unit_projection_own_unit_and_the_mixin_head(tmp_path):
    results = _launch(tmp_path, "fsdp2")
    # the mixin's capture and term with its head in the root unit of a fully_shard-ed model
    # (each decoder layer a unit, as accelerate wraps): the gradients of one process
    head = results["mixin_head"]
    assert head["same_names"] and head["head_scale"] > 1e-3
    assert head["error"] < 1e-6 * max(1.0, head["scale"]) + 1e-7, head
    for name in ("clreg_loss_one_unit", "clreg_loss_own_unit"):
        case = results[name]  # CLRegLoss owning its projection
        assert case["scale"] > 1e-3
        assert case["error"] < 1e-6 * case["scale"] + 1e-7, (name, case)
        assert case["input_error"] < 1e-6 and case["loss_error"] < 1e-6
        assert "DTensor" in case["shard_error"] and "weight=None" in case["shard_error"]


# ----------------------------------------------------------------------------- in process

def _zero3_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor that carries a ZeRO-3 partitioned parameter's attributes."""
    t.ds_id, t.ds_status, t.ds_shape = 3, "NOT_AVAILABLE", (4, 6)
    return t


@pytest.mark.parametrize("weight, error, words", [
    (lambda: _zero3_like(torch.empty(0)), TypeError, "ZeRO-3.*weight=None"),
    (lambda: _zero3_like(torch.randn(4, 6)), TypeError, "ZeRO-3"),  # even when gathered
    (lambda: torch.empty(0), ValueError, "empty 1-D.*FSDP1.*weight=None"),
])
def test_fused_loss_refuses_a_sharded_weight(weight, error, words):
    forget = torch.randn(4, 6)
    with pytest.raises(error, match=words):
        fused_clreg_loss(forget, None, weight())


def test_fused_loss_refuses_a_zero3_bias():
    with pytest.raises(TypeError, match="bias is a DeepSpeed ZeRO-3"):
        fused_clreg_loss(torch.randn(4, 6), None, torch.randn(3, 6), _zero3_like(torch.empty(0)))


def test_clreg_loss_projects_as_a_module_only_when_the_projection_is_sharded(monkeypatch):
    """The module path (for engines) and the fused path give the same loss and gradients."""
    torch.manual_seed(0)
    loss_fn = CLRegLoss(6, 3, temperature=0.2, backend="torch")
    assert not projection_is_sharded(loss_fn.projection)
    forget = torch.randn(5, 6, requires_grad=True)
    retain = torch.randn(4, 6)
    labels = torch.tensor([0, 0, 1, 1, 2])
    results = []
    for sharded in (False, True):
        monkeypatch.setattr("clreg_fast.modules.projection_is_sharded", lambda _m, s=sharded: s)
        calls = []
        handle = loss_fn.projection.register_forward_hook(lambda *a: calls.append(1))
        loss = loss_fn(forget, retain, labels=labels)
        handle.remove()
        assert len(calls) == (1 if sharded else 0)  # one call on forget and retain together
        grads = torch.autograd.grad(loss, [forget, loss_fn.projection.weight,
                                           loss_fn.projection.bias])
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="projection takes 6"):
        loss_fn(torch.randn(4, 5), None)


@needs_hf
def test_clreg_negatives_is_checked_and_global_on_one_process_is_local(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests", "dist_scripts"))
    import hf_testing as H

    with pytest.raises(ValueError, match="clreg_negatives"):
        H.CLRegGradDiff(model=H.tiny_model(), args=H.training_args(tmp_path / "bad"),
                        train_dataset=H.make_pairs(4), data_collator=H.collate_pairs,
                        clreg_negatives="all")
    losses = []
    for negatives in ("local", "global"):
        trainer = H.CLRegGradDiff(model=H.tiny_model(), args=H.training_args(tmp_path / negatives),
                                  train_dataset=H.make_pairs(4), data_collator=H.collate_pairs,
                                  clreg_proj_dim=8, clreg_negatives=negatives)
        assert trainer._clreg_process_group() is None  # no process group: this process only
        trainer.train()
        losses.append([e["clreg_loss"] for e in trainer.state.log_history if "clreg_loss" in e])
    assert losses[0] == losses[1] and len(losses[0]) == 1


def _retain_check_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of ``test_the_identical_retain_rows_warning_*`` (spawned, 2 gloo ranks)."""
    import datetime
    import logging

    import torch.distributed as dist

    from clreg_fast.integrations.hf import CLRegMixin

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("clreg_fast.integrations.hf").addHandler(handler)

    def check(retain):
        trainer = CLRegMixin.__new__(CLRegMixin)  # the check needs no Trainer state
        trainer.clreg_negatives = "global"
        before = len(messages)
        trainer._check_retain_rows_differ(retain)
        # checked once: a later call runs no collective (rank 1 skips it: would hang if it did)
        if rank == 0:
            trainer._check_retain_rows_differ(retain)
        return len(messages) > before

    same = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 1]])}
    results = {
        "same": check(same),
        "differ": check({"input_ids": same["input_ids"] + rank}),
        "one_rank_without_retain": check(same if rank == 0 else None),
    }
    dist.barrier()
    dist.destroy_process_group()
    torch.save({"results": results, "messages": messages}, os.path.join(out_dir, f"{rank}.pt"))


@needs_hf
@pytest.mark.slow  # ~9 s: two spawned processes import torch
def test_the_identical_retain_rows_warning_fires_once_and_keeps_ranks_in_step(tmp_path):
    """Global negatives with every rank's retain rows equal (OpenUnlearning's issue #139) warn;
    different rows, or a rank without retain rows, do not; no rank waits on another."""
    import torch.multiprocessing as mp

    mp.spawn(_retain_check_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out["results"] == {"same": True, "differ": False,
                                  "one_rank_without_retain": False}, (rank, out)
        assert len(out["messages"]) == 1 and "counts 2 times" in out["messages"][0]

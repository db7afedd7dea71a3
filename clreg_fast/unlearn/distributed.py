"""torch.distributed plumbing of the unlearning loop: the process group and DDP/FSDP2 wrapping.

Kept out of ``train.py`` so the loop reads top to bottom; nothing here knows about the losses.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from clreg_fast.unlearn.features import decoder_layers


@dataclass
class DistInfo:
    """This process's place in the run (``rank 0 of 1`` without a process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled and self.world > 1:
            dist.barrier()


def side_group(d: DistInfo):
    """A new process group of every rank, for collectives that run inside the wrapped forward
    and backward (cross-rank CLReg, the shared retain queue): on a group of their own they never
    queue up behind, or interleave with, DDP's and FSDP's gradient traffic on the default group.
    None for a single process. Every rank must call this; destroy it with
    ``torch.distributed.destroy_process_group(group)``."""
    if not d.enabled or d.world == 1:
        return None
    return dist.new_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: str) -> DistInfo:
    """The process group for ``parallel`` ("none", "ddp", "fsdp"), created from the torchrun
    environment when none exists (NCCL on CUDA, gloo on CPU) and then left up."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if env_world > 1 or (dist.is_available() and dist.is_initialized()
                             and dist.get_world_size() > 1):
            raise ValueError(f"launched with WORLD_SIZE={env_world} but parallel='none'; "
                             "use parallel='ddp' or 'fsdp' under torchrun")
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # a plain `python` run: a one-process group so the same code path runs
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy)`` from wherever this torch keeps FSDP2."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def wrap(objective: nn.Module, reference: Optional[nn.Module], parallel: str,
         device: torch.device, bf16: bool, find_unused_parameters: bool = False) -> nn.Module:
    """The module the loop calls: ``objective`` itself, its DDP wrapper, or (FSDP2) the objective
    sharded in place, every decoder block first and then the root; the frozen reference is
    sharded the same way. ``objective.model`` / ``reference.model`` hold the decoder blocks."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters)
    if parallel != "fsdp":
        return objective
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    kwargs, root_kwargs = {}, {}
    if bf16:  # FSDP2 casts by policy, not autocast
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        # The objective's float inputs are the reference's float32 NLL sums (NPO): cast to
        # bf16 they would shift log p - log p_ref by up to ~1%.
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in decoder_layers(objective.model):
        fully_shard(block, **kwargs)
    fully_shard(objective, **root_kwargs)
    if reference is not None:
        for block in decoder_layers(reference.model):
            fully_shard(block, **kwargs)
        fully_shard(reference, **kwargs)
    return objective


@contextlib.contextmanager
def full_params(objective: nn.Module, parallel: str):
    """Under FSDP, gather the root's parameters so the bare model can be called directly."""
    if parallel != "fsdp":
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def reduce_logs(log_sums: Dict[str, torch.Tensor], d: DistInfo, device) -> Dict[str, float]:
    """Per-rank sums of the step's logged values -> their sums over ranks, as floats."""
    keys = sorted(log_sums)
    if not keys:
        return {}
    values = torch.stack([torch.as_tensor(log_sums[k], device=device).float() for k in keys])
    d.all_reduce_sum(values)
    return {k: float(v) for k, v in zip(keys, values.tolist())}

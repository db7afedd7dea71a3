"""Checkpoints of the unlearning loop: atomic directories that Hugging Face can load.

``OUT/checkpoint-N/`` holds the model (``save_pretrained``: ``config.json`` and safetensors),
the CLReg projection head (``clreg_head.safetensors``, when there is one),
``unlearn_config.json`` and ``trainer_state.pt`` (optimizer, scheduler, sampler and per-rank RNG
states, the CLReg retain feature queue, the log so far and the step); ``OUT/final/`` holds the same minus the trainer state.
Each directory is written under a temporary name and renamed into place, so an interrupted save
never leaves a half-written checkpoint under a real name.

Under FSDP the full model and optimizer states are gathered to rank 0 (a collective: every
rank calls the save functions) and rank 0 writes.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from clreg_fast.unlearn.distributed import DistInfo

TRAINER_STATE = "trainer_state.pt"
HEAD_FILE = "clreg_head.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- directories

def latest_checkpoint(out_dir: Optional[str]) -> Optional[str]:
    """The complete ``checkpoint-N`` directory of ``out_dir`` with the largest N, or None."""
    if not out_dir or not os.path.isdir(out_dir):
        return None
    found = []
    for name in os.listdir(out_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(out_dir, name, TRAINER_STATE)):
            found.append((int(match.group(1)), name))
    return os.path.join(out_dir, max(found)[1]) if found else None


def resume_dir(resume, out_dir: Optional[str]) -> Optional[str]:
    """The checkpoint ``resume`` names: a path, or (True) the newest one in ``out_dir``."""
    if not resume:
        return None
    if not isinstance(resume, str):
        return latest_checkpoint(out_dir)
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint ({TRAINER_STATE} missing)")
    return resume


def atomic_dir_write(final_dir: str, write: Callable[[str], None]) -> None:
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


def prune_checkpoints(out_dir: str, keep: Optional[int]) -> None:
    """Delete all but the newest ``keep`` checkpoint-N directories (keep None or 0: none)."""
    if not keep:
        return
    found = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                   if (m := CHECKPOINT_RE.match(name)))
    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# --------------------------------------------------------------------------- model weights

def save_pretrained(model: nn.Module, directory: str, state_dict=None) -> None:
    """``model.save_pretrained`` as safetensors, without transformers' own progress bar."""
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


def load_model_weights(model: nn.Module, directory: str) -> None:
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


def load_head(head: nn.Module, directory: str) -> None:
    """Load the CLReg projection head of a checkpoint into ``head``, if it saved one."""
    path = os.path.join(directory, HEAD_FILE)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        head.load_state_dict(load_file(path))


# --------------------------------------------------------------------------- save

def _full_state(objective: nn.Module, optimizer, fsdp: bool):
    """(model state dict or None, head state dict or None, optimizer state dict or None).

    Under FSDP the full states are gathered (a collective). Otherwise the model state is None:
    ``save_pretrained`` reads the model itself.
    """
    if fsdp:
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


def _write_model_dir(directory: str, model: nn.Module, model_sd, head_sd, config: dict) -> None:
    save_pretrained(model, directory, state_dict=model_sd)
    if head_sd:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in head_sd.items()},
                  os.path.join(directory, HEAD_FILE))
    with open(os.path.join(directory, "unlearn_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def _gather_rng(d: DistInfo) -> List[dict]:
    """Every rank's torch RNG states, in rank order (a collective)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if d.enabled and d.world > 1:
        states = [None] * d.world
        dist.all_gather_object(states, state)
        return states
    return [state]


def _gather_queue(queue, d: DistInfo) -> Optional[List[dict]]:
    """The retain feature queue's state on CPU: one entry when every rank holds the same queue
    (it has a process group), else every rank's, in rank order (a collective)."""
    if queue is None:
        return None
    state = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
             for k, v in queue.state_dict().items()}
    if queue.process_group is None and d.enabled and d.world > 1:
        states = [None] * d.world
        dist.all_gather_object(states, state)
        return states
    return [state]


def save_checkpoint(directory: str, model: nn.Module, objective: nn.Module, optimizer, scheduler,
                    streams: Dict[str, object], history: List[dict], step: int, cfg,
                    d: DistInfo, queue=None) -> None:
    """Write ``checkpoint-N``; ``streams`` are the samplers by name (their state dicts are kept),
    ``queue`` the CLReg ``RetainFeatureQueue`` or None. Then prune old checkpoints
    (``cfg.keep_checkpoints``). Every rank calls this."""
    fsdp = cfg.parallel == "fsdp"
    model_sd, head_sd, optim_sd = _full_state(objective, optimizer, fsdp)  # collective under FSDP
    rng = _gather_rng(d)  # collective
    queue_states = _gather_queue(queue, d)  # collective for per-rank queues
    if d.rank == 0:
        state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 **{name: stream.state_dict() for name, stream in streams.items()},
                 "rng": rng, "history": history, "step": step, "world_size": d.world}
        if queue_states is not None:
            state["clreg_queue"] = queue_states

        def write(tmp):
            _write_model_dir(tmp, model, model_sd, head_sd, cfg.to_dict())
            torch.save(state, os.path.join(tmp, TRAINER_STATE))

        atomic_dir_write(directory, write)
        prune_checkpoints(cfg.out_dir, cfg.keep_checkpoints)
    d.barrier()


def save_final(directory: str, model: nn.Module, objective: nn.Module, cfg, d: DistInfo) -> None:
    """Write the model, head and config (no trainer state). Every rank calls this."""
    model_sd, head_sd, _ = _full_state(objective, None, cfg.parallel == "fsdp")
    if d.rank == 0:
        atomic_dir_write(directory, lambda tmp: _write_model_dir(tmp, model, model_sd, head_sd,
                                                                 cfg.to_dict()))
    d.barrier()


# --------------------------------------------------------------------------- resume

def load_trainer_state(directory: str, objective: nn.Module, optimizer, scheduler,
                       streams: Dict[str, object], fsdp: bool, d: DistInfo, queue=None
                       ) -> Tuple[List[dict], int]:
    """Restore optimizer, scheduler, samplers, this rank's RNG and (``queue``) the CLReg retain
    feature queue from a checkpoint; returns ``(history, step)``. The model weights and head are
    loaded separately, before wrapping."""
    state = torch.load(os.path.join(directory, TRAINER_STATE), map_location="cpu",
                       weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(objective, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, stream in streams.items():
        stream.load_state_dict(state[name])
    rng = state["rng"]
    if len(rng) != d.world:
        warnings.warn(f"checkpoint was written by {len(rng)} ranks, this run has "
                      f"{d.world}; RNG streams (dropout) will differ")
    own = rng[d.rank % len(rng)]
    torch.set_rng_state(own["cpu"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])
    if queue is not None:
        _load_queue(queue, state.get("clreg_queue"), directory, d)
    return list(state["history"]), int(state["step"])


def _load_queue(queue, saved: Optional[List[dict]], directory: str, d: DistInfo) -> None:
    if not saved:
        warnings.warn(f"checkpoint {directory} holds no CLReg retain feature queue (it was written "
                      "with clreg_queue_size=0); the queue starts empty, so the run will not "
                      "match an uninterrupted one")
        return
    shared = queue.process_group is not None
    if len(saved) > 1 and shared:
        warnings.warn("the checkpoint holds one retain feature queue per rank (clreg_negatives="
                      "'local') but this run shares one over all ranks ('global'); using rank 0's")
    elif len(saved) == 1 and not shared and d.world > 1:
        warnings.warn("the checkpoint holds one shared retain feature queue (clreg_negatives="
                      "'global') but this run keeps one per rank ('local'); every rank starts "
                      "from it")
    elif len(saved) > 1 and len(saved) != d.world:
        warnings.warn(f"checkpoint has the retain feature queues of {len(saved)} ranks, this run "
                      f"has {d.world}; rank r takes queue r mod {len(saved)}")
    own = saved[0] if shared else saved[d.rank % len(saved)]
    features = own["features"]
    if features.shape != queue.features.shape:
        raise ValueError(f"checkpoint {directory} holds a retain feature queue of shape "
                         f"{tuple(features.shape)}, this run's is {tuple(queue.features.shape)} "
                         "(clreg_queue_size, or the feature width, changed)")
    queue.load_state_dict({k: (v.to(queue.features.device) if isinstance(v, torch.Tensor) else v)
                           for k, v in own.items()})

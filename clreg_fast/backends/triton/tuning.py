"""Launch configurations of the similarity kernels: defaults, candidates, and tuned tables.

A launch configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages). It depends on the kernel,
the GPU architecture, the feature tile (BLOCK_P, number of P tiles) and the operand kind
(``fp32``, ``tf32``, ``bf16``, ``fp16``), the *shape class* of a launch.

* ``default_config``: today's fixed choice, used whenever no tuned table matches.
* ``candidates``: the configurations the autotuner may pick for a shape class. Every candidate is
  tested for correctness under the interpreter (tests/test_triton_tuning.py) and compiled for
  sm_80 and sm_90 without register spills and within shared memory (``compile_check
  --candidates``); a table naming anything else is ignored.
* Tuned tables: JSON files written by ``python -m clreg_fast.backends.triton.autotune`` on a GPU.
  ``load_table`` reads them once per device (packaged tables in ``tuned/`` and the file or folder
  named by ``CLREG_TRITON_TUNING``) and keeps the entries whose device name, compute capability
  and triton version match; a launch then costs one dict lookup. Nothing is tuned at launch.

In the column kernel (``lse_backward_cols``) BLOCK_N is the number of columns a program owns,
the M side of its products: Hopper's ``wgmma`` needs it >= 64 (64 x 32 compiles to ``mma.sync``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton

TABLE_ENV = "CLREG_TRITON_TUNING"
TABLE_DIR = Path(__file__).resolve().parent / "tuned"
TABLE_FORMAT = 1

SIMILARITY_KERNELS = ("lse_forward", "lse_backward_rows", "lse_backward_cols")
KINDS = ("fp32", "tf32", "bf16", "fp16")
ARCHS = (80, 90)


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict:
        return self._asdict()

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a dict, got {type(data).__name__}")
        values = {name: data.get(name) for name in cls._fields}
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name} must be a positive int, got {value!r}")
        return cls(**values)


# The interpreter ignores warps and stages; small blocks keep it fast while test shapes still
# span several partial tiles.
INTERPRET_CONFIG = KernelConfig(16, 16, 4, 1)


def shape_class(kernel: str, kind: str, block_p: int, k_tiles: int) -> str:
    """The key of a launch in a tuned table, e.g. ``lse_forward/bf16/p256/k1``."""
    if kernel not in SIMILARITY_KERNELS:
        raise ValueError(f"kernel must be one of {SIMILARITY_KERNELS}, got {kernel!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"{kernel}/{kind}/p{block_p}/k{k_tiles}"


def default_config(kernel: str, kind: str, block_p: int, k_tiles: int) -> KernelConfig:
    """The untuned configuration (chosen by compiling for sm_90 and sm_80; not timed on a GPU).

    float32 products run on FMA units, whose operands live in registers: smaller tiles than the
    tensor-core kinds. The column kernel gets BLOCK_N >= 64 wherever its M side runs on tensor
    cores at K_TILES == 1 (wgmma on sm_90). With P > 256 (K_TILES > 1) the scores are summed over
    64-feature chunks (``kernels.SCORE_CHUNK``) and the backward keeps a BLOCK_P-wide
    accumulator: 32 x 32 tiles with 8 warps, except the tensor-core forward (64 x 32 with 4
    warps: wgmma on sm_90; 32 x 32 spills there, 8 warps spill 8 bytes on sm_80 at P = 512), and
    one stage for the float32 forward and row backward (two spill 20-110 bytes on sm_90 at P =
    300 or 512). Known: where P > 256 is not a multiple of 16 (no divisibility hints, e.g. P =
    300) the tensor-core forward spills 240-304 bytes and the float32 column backward 80 on sm_80
    (none on sm_90); at the multiples of 16 nothing spills.
    """
    if block_p <= 32:  # the float32 backward with 4 warps spills 200-300 bytes on sm_80
        cfg = KernelConfig(64, 64, 8 if kind == "fp32" and kernel != "lse_forward" else 4, 3)
    elif k_tiles > 1:
        cfg = KernelConfig(32, 32, 8, 2)
        if kernel == "lse_forward" and kind != "fp32":
            cfg = KernelConfig(64, 32, 4, 2)
        elif kernel != "lse_backward_cols" and kind == "fp32":
            cfg = KernelConfig(32, 32, 8, 1)
    elif kind == "fp32":
        # the running-max forward with 4 warps spills ~400 bytes on sm_90 at BLOCK_P = 128
        cfg = KernelConfig(32, 32, 8 if kernel == "lse_forward" or block_p > 128 else 4, 2)
    elif block_p <= 64:
        cfg = KernelConfig(64, 64, 4, 3)
    else:
        cfg = KernelConfig(64, 32, 8, 2)
        if kernel == "lse_backward_cols":
            cfg = KernelConfig(32, 64, 8, 2)
        elif kernel == "lse_backward_rows" and block_p == 128:
            cfg = KernelConfig(64, 32, 4, 2)  # with 8 warps it spills 24 bytes on sm_80
    return cfg


# Candidates per (kernel, kind group, BLOCK_P) at K_TILES == 1, as (BLOCK_M, BLOCK_N, warps,
# stages), besides the default. Picked from the grid of ``compile_check --grid`` (BLOCK_M,
# BLOCK_N in 32/64/128, warps 4/8, stages 2/3; stage 4 of the smaller tiles tried after): the
# variants around the default, less every one that spilled registers or passed an A100's 163 KiB
# of shared memory per block on sm_80 or sm_90 with triton 3.8 (so one list serves both). Larger tiles mostly spill: the backward at BLOCK_P = 256
# keeps a 64 x 256 float32 accumulator per program and fits with 8 warps and 32-wide steps only;
# float32 backward at P = 256 has no alternative to its default. ``compile_check --candidates``
# checks every entry and a slow test holds them to it. Compiled with the divisibility hints of a
# real launch (since compile_check passes them) a few entries spilled and were dropped: float32
# forward 64 x 32 and 32 x 64 at BLOCK_P = 256 and 32 x 32 at 128 with 4 warps, or 8 and 3-4
# stages (running max, sm_90), and the bf16/fp16 row backward 64 x 32 with 8 warps and 64 x 64
# with 4 at 128 (sm_80). bf16 and fp16 share a list; tf32 and P <= 64 or tiled P have the
# default only.
_CANDIDATES: Dict[Tuple[str, str, int], Tuple[Tuple[int, int, int, int], ...]] = {
    ("lse_forward", "lowp", 256): ((64, 64, 8, 2), (128, 32, 8, 2)),
    ("lse_backward_rows", "lowp", 256): ((64, 32, 8, 3), (64, 32, 8, 4)),
    ("lse_backward_cols", "lowp", 256): ((32, 64, 8, 3), (32, 64, 8, 4), (64, 64, 8, 2)),
    ("lse_forward", "lowp", 128): ((64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4),
                                   (128, 64, 8, 2), (64, 128, 4, 2)),
    ("lse_backward_rows", "lowp", 128): ((64, 64, 8, 2), (64, 64, 8, 3)),
    ("lse_backward_cols", "lowp", 128): ((32, 64, 8, 3), (32, 64, 8, 4), (64, 64, 4, 2),
                                         (64, 64, 8, 3)),
    ("lse_forward", "fp32", 256): ((32, 32, 8, 3), (32, 32, 8, 4)),
    ("lse_backward_cols", "fp32", 256): ((32, 32, 8, 3),),
    ("lse_backward_rows", "fp32", 128): ((32, 32, 4, 3), (64, 32, 8, 2)),
    ("lse_backward_cols", "fp32", 128): ((32, 32, 4, 3), (32, 64, 8, 2)),
}


def _grid(kernel: str, group: str, block_p: int):
    return _CANDIDATES.get((kernel, group, block_p), ())


def candidates(kernel: str, kind: str, block_p: int, k_tiles: int) -> List[KernelConfig]:
    """The configurations the autotuner may choose for a shape class (the default first)."""
    shape_class(kernel, kind, block_p, k_tiles)  # an unknown kernel or kind is an error
    default = default_config(kernel, kind, block_p, k_tiles)
    out = [default]
    if k_tiles == 1 and kind != "tf32":
        group = "fp32" if kind == "fp32" else "lowp"
        for values in _grid(kernel, group, block_p):
            cfg = KernelConfig(*values)
            if cfg not in out:
                out.append(cfg)
    return out


# ------------------------------------------------------------------------------ tuned tables

_loaded: Dict[int, Dict[str, KernelConfig]] = {}


def _versions() -> dict:
    return {"triton": triton.__version__, "torch": torch.__version__}


def _same_minor(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def device_record(index: int) -> dict:
    """What a table records of the device it was tuned on."""
    return {"name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index))}


def _table_files() -> List[Path]:
    files = sorted(TABLE_DIR.glob("*.json")) if TABLE_DIR.is_dir() else []
    extra = os.environ.get(TABLE_ENV)
    if extra:
        path = Path(extra)
        if path.is_dir():
            files = sorted(path.glob("*.json")) + files
        elif path.is_file():
            files = [path] + files
        else:
            warnings.warn(f"{TABLE_ENV}={extra} is neither a file nor a folder; ignored",
                          RuntimeWarning, stacklevel=3)
    return files  # the user's tables first: they win over the packaged ones


def _parse_shape_class(key: str) -> Tuple[str, str, int, int]:
    """The inverse of ``shape_class``; a key it would not write is a ValueError."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 4 or not parts[2].startswith("p") or not parts[3].startswith("k"):
        raise ValueError("a shape class is KERNEL/KIND/p<BLOCK_P>/k<K_TILES>")
    kernel, kind = parts[0], parts[1]
    block_p, k_tiles = int(parts[2][1:]), int(parts[3][1:])
    if block_p < 16 or block_p & (block_p - 1) or k_tiles < 1:
        raise ValueError("BLOCK_P must be a power of two >= 16 and K_TILES >= 1")
    if shape_class(kernel, kind, block_p, k_tiles) != key:  # e.g. p0256
        raise ValueError("not in the canonical form")
    return kernel, kind, block_p, k_tiles


def parse_table(data: dict, device: dict, source: str = "table") -> Dict[str, KernelConfig]:
    """The entries of a table that apply to ``device`` (name, capability) with this triton.

    Entries naming a configuration outside ``candidates`` (untested, not compile-checked) are
    dropped with a warning; a table for another device or triton version gives ``{}``; so does,
    with a warning, one whose structure is not a table's (never an exception: tables are read
    at the first launch).
    """
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        warnings.warn(f"{source}: not a clreg_fast triton tuning table (format "
                      f"{TABLE_FORMAT}); ignored", RuntimeWarning, stacklevel=3)
        return {}
    dev, versions, entries = (data.get(name, {}) for name in ("device", "versions", "entries"))
    if not all(isinstance(part, dict) for part in (dev, versions, entries)):
        warnings.warn(f"{source}: 'device', 'versions' and 'entries' must be objects; ignored",
                      RuntimeWarning, stacklevel=3)
        return {}
    capability = dev.get("capability", [])
    if dev.get("name") != device["name"] or not isinstance(capability, (list, tuple)) \
            or list(capability) != list(device["capability"]):
        return {}
    if not _same_minor(str(versions.get("triton", "")), triton.__version__):
        return {}
    out = {}
    for key, entry in entries.items():
        try:
            kernel, kind, block_p, k_tiles = _parse_shape_class(key)
            cfg = KernelConfig.from_dict(entry.get("config"))
            allowed = candidates(kernel, kind, block_p, k_tiles)
        except (ValueError, AttributeError) as exc:
            warnings.warn(f"{source}: entry {key!r} is malformed ({exc}); ignored",
                          RuntimeWarning, stacklevel=3)
            continue
        if cfg not in allowed:
            warnings.warn(f"{source}: entry {key!r} names {cfg}, not a tested candidate; ignored",
                          RuntimeWarning, stacklevel=3)
            continue
        out[key] = cfg
    return out


def load_table(index: int) -> Dict[str, KernelConfig]:
    """The tuned entries for CUDA device ``index``, read from disk on the first call only."""
    table = _loaded.get(index)
    if table is None:
        table = {}
        device = device_record(index)
        for path in _table_files():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                warnings.warn(f"cannot read the tuning table {path}: {exc}; ignored",
                              RuntimeWarning, stacklevel=2)
                continue
            for key, cfg in parse_table(data, device, str(path)).items():
                table.setdefault(key, cfg)
        _loaded[index] = table
    return table


def reload_tables() -> None:
    """Forget the loaded tables (after writing one, or in tests)."""
    _loaded.clear()


def lookup(kernel: str, kind: str, block_p: int, k_tiles: int,
           device: Optional[torch.device]) -> KernelConfig:
    """The configuration of a launch on ``device``: tuned when a table matches, else default."""
    if device is not None and device.type == "cuda":
        key = f"{kernel}/{kind}/p{block_p}/k{k_tiles}"
        cfg = load_table(device.index if device.index is not None
                         else torch.cuda.current_device()).get(key)
        if cfg is not None:
            return cfg
    return default_config(kernel, kind, block_p, k_tiles)


def make_table(device_index: int, entries: Dict[str, dict], extra: Optional[dict] = None) -> dict:
    """A table as ``autotune`` writes it: the device, versions and shape class -> entry."""
    table = {"format": TABLE_FORMAT, "device": device_record(device_index),
             "versions": _versions(), "entries": entries}
    table.update(extra or {})
    return table


__all__ = ["KernelConfig", "candidates", "default_config", "lookup", "load_table",
           "reload_tables", "parse_table", "shape_class", "make_table", "TABLE_ENV"]

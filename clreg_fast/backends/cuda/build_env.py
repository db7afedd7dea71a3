"""Where the CUDA toolkit is and how the extension is compiled; shared by setup.py and the JIT loader.

This module imports nothing from torch or clreg_fast at import time: setup.py loads it by path,
before it knows whether torch is importable.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional, Tuple

ENV_BUILD = "CLREG_FAST_CUDA_BUILD"  # "1": build or fail, "0": never build, unset: when possible
DEFAULT_ARCH_LIST = "8.0;9.0"       # A100 (sm_80), H100/H200 (sm_90)
EXTENSION_NAME = "clreg_fast._C"
# Kernel code in .cu files, PyTorch glue in bindings.cpp, shared declarations in headers.
# torch_ops.cpp registers the same functions as torch.ops.clreg_fast.cuda_* (TORCH_LIBRARY).
SOURCES = ("bindings.cpp", "torch_ops.cpp", "lse_forward.cu", "lse_backward.cu", "sweep_tc.cu",
           "sweep_simt.cu")
HEADERS = ("clreg.h", "clreg_torch.h", "splits.h", "tiles.cuh", "mma_sm80.cuh")

# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 up to
# torch 2.x, C++20 for recent releases); the sources compile under both.
# -g0 overrides the -g of Python's default flags: host debug info of the PyTorch headers would
# make up most of a 13 MB module.
CXX_FLAGS = ["-O3", "-g0"]
# -Xptxas=-v prints registers, spills and shared memory of every kernel into the build log.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-v"]


def build_mode() -> str:
    """``"force"``, ``"skip"`` or ``"auto"`` from ``CLREG_FAST_CUDA_BUILD``."""
    value = os.environ.get(ENV_BUILD, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "skip"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{ENV_BUILD} must be 1 (build the CUDA extension or fail), 0 (skip it) or "
                     f"unset (build when possible), got {value!r}")


def _nvcc_in(home: Optional[str]) -> Optional[str]:
    if not home:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    return nvcc if os.path.isfile(nvcc) else None


def _real_nvcc(path: str) -> str:
    """The compiler behind ``path``: follows symlinks and one-line wrapper scripts (exec .../nvcc)."""
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return path
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match and os.path.isfile(match.group(1).decode()):
            return os.path.realpath(match.group(1).decode())
    return path


def find_cuda_home() -> Tuple[Optional[str], str]:
    """``(CUDA_HOME, how it was found)``, or ``(None, what was tried)``.

    Order: $CUDA_HOME / $CUDA_PATH, then the nvcc on PATH (through symlinks and wrapper
    scripts, which make torch's own guess wrong), then torch's guess, then /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if _nvcc_in(home):
            return home, f"${var}"
    on_path = shutil.which("nvcc")
    if on_path:
        home = os.path.dirname(os.path.dirname(_real_nvcc(on_path)))
        if _nvcc_in(home):
            return home, f"nvcc on PATH ({on_path})"
    try:  # torch's guess; importing cpp_extension is cheap once torch is loaded
        from torch.utils import cpp_extension

        if _nvcc_in(cpp_extension.CUDA_HOME):
            return cpp_extension.CUDA_HOME, "torch.utils.cpp_extension.CUDA_HOME"
    except Exception:  # torch missing or broken: setup.py reports that separately
        pass
    if _nvcc_in("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no nvcc in $CUDA_HOME, $CUDA_PATH, PATH or /usr/local/cuda"


def nvcc_version(cuda_home: str) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of ``cuda_home``'s nvcc, or None if it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def toolkit_problem(cuda_home: Optional[str], torch_cuda: Optional[str]) -> Optional[str]:
    """Why this toolkit cannot build for this torch, or None when it can."""
    if torch_cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    version = nvcc_version(cuda_home)
    if version is None:
        return f"{cuda_home}/bin/nvcc --version failed"
    torch_major = int(torch_cuda.split(".")[0])
    if version[0] != torch_major:
        return (f"nvcc {version[0]}.{version[1]} in {cuda_home} does not match the CUDA "
                f"{torch_cuda} that torch was built with")
    return None


def source_paths(csrc_dir: str) -> List[str]:
    return [os.path.join(csrc_dir, name) for name in SOURCES]

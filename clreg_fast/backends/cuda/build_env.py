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
HEADERS = ("clreg.h", "clreg_torch.h", "splits.h", "tiles.cuh", "mma_sm80.cuh", "sweep_dispatch.cuh",
           "wgmma_layouts.cuh")
# The Hopper sweep (CuTe wgmma kernels): compiled only when the CUTLASS headers are found and the
# arch list has a 9.0 entry; it then gets -DCLREG_WITH_WGMMA (bindings.cpp too).
WGMMA_SOURCE = "sweep_wgmma.cu"
ENV_CUTLASS = "CLREG_FAST_CUTLASS_INCLUDE"  # CUTLASS include dir; "0" turns the wgmma build off
WGMMA_DEFINE = "-DCLREG_WITH_WGMMA"

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


def source_names(with_wgmma: bool) -> List[str]:
    return list(SOURCES) + ([WGMMA_SOURCE] if with_wgmma else [])


def source_paths(csrc_dir: str, with_wgmma: bool = False) -> List[str]:
    return [os.path.join(csrc_dir, name) for name in source_names(with_wgmma)]


# sweep_wgmma.cu is written against the CuTe API of CUTLASS 4.2 (the nvidia-cutlass wheel it was
# built with); headers outside [min, next major) would fail the compile of the whole extension,
# so they are not used (the build goes on without the wgmma sweep and says why).
CUTLASS_MIN_VERSION = (4, 2)
CUTLASS_BELOW_VERSION = (5, 0)


def _is_cutlass_include(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cute", "tensor.hpp")) and os.path.isfile(
        os.path.join(path, "cutlass", "cutlass.h"))


def cutlass_version(include: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from ``cutlass/version.h`` under `include`, None when it does not say."""
    try:
        with open(os.path.join(include, "cutlass", "version.h"), errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    major = re.search(r"#define\s+CUTLASS_MAJOR\s+(\d+)", text)
    minor = re.search(r"#define\s+CUTLASS_MINOR\s+(\d+)", text)
    if not (major and minor):
        return None
    return int(major.group(1)), int(minor.group(1))


def _cutlass_version_problem(include: str) -> Optional[str]:
    version = cutlass_version(include)
    wanted = (f">= {CUTLASS_MIN_VERSION[0]}.{CUTLASS_MIN_VERSION[1]}, "
              f"< {CUTLASS_BELOW_VERSION[0]}.{CUTLASS_BELOW_VERSION[1]}")
    if version is None:
        return (f"the CUTLASS headers in {include} have no readable cutlass/version.h "
                f"(version {wanted} needed)")
    if not CUTLASS_MIN_VERSION <= version < CUTLASS_BELOW_VERSION:
        return (f"the CUTLASS headers in {include} are version {version[0]}.{version[1]}; "
                f"the wgmma sweep needs version {wanted}")
    return None


def find_cutlass_include() -> Tuple[Optional[str], str]:
    """``(CUTLASS/CuTe include dir, how it was found)``, or ``(None, why not)``.

    $CLREG_FAST_CUTLASS_INCLUDE first ("0" or "" turns the wgmma build off; a wrong path is an
    answer too, not a reason to look elsewhere), else the installed ``cutlass_library`` package
    (the nvidia-cutlass wheel) found without importing it: its ``source/include``.
    """
    explicit = os.environ.get(ENV_CUTLASS)
    if explicit is not None:
        explicit = explicit.strip()
        if explicit in ("", "0"):
            return None, f"${ENV_CUTLASS}={explicit!r} turns the wgmma sweep off"
        if _is_cutlass_include(explicit):
            problem = _cutlass_version_problem(explicit)
            if problem:
                return None, f"${ENV_CUTLASS}: {problem}"
            return explicit, f"${ENV_CUTLASS}"
        return None, f"${ENV_CUTLASS}={explicit} has no cute/tensor.hpp and cutlass/cutlass.h"
    import importlib.util

    try:  # find_spec of a top-level package locates it without running its __init__
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, ("no CUTLASS headers: the nvidia-cutlass package (cutlass_library) is not "
                      f"installed and ${ENV_CUTLASS} is unset (`pip install --no-deps "
                      "nvidia-cutlass==4.2.0.0`)")
    for location in spec.submodule_search_locations:
        include = os.path.join(location, "source", "include")
        if _is_cutlass_include(include):
            problem = _cutlass_version_problem(include)
            if problem:
                return None, f"the installed nvidia-cutlass package: {problem}"
            return include, "the installed nvidia-cutlass package (cutlass_library)"
    return None, "the installed cutlass_library package has no source/include with CuTe"


# PTX of a "9.0+PTX" entry: compute_90 (portable), not compute_90a, see with_sm90a.
SM90_PORTABLE_PTX_FLAG = "-gencode=arch=compute_90,code=compute_90"


def _arch_entries(arch_list: str) -> List[str]:
    return [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]


def with_sm90a(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST with its 9.0 entries built as sm_90a ("9.0", "9.0+PTX" -> "9.0a").

    wgmma exists only in the arch-specific sm_90a target. Replacing (not adding) the entry keeps
    one cubin for compute capability 9.0, so an H100/H200 loads the sm_90a code of every kernel;
    sm_90a cubins run on 9.0 devices only, which is all a cubin for 9.0 was for. The PTX of a
    "9.0+PTX" entry is another matter: it is there for newer GPUs (sm_100, ...) to compile at
    load time, and compute_90a PTX loads on sm_90a only, so torch must not get "9.0a+PTX";
    nvcc_flags(include, original list) adds the compute_90 PTX instead. Other entries are kept.
    """
    return ";".join("9.0a" if e in ("9.0", "9.0+PTX") else e for e in _arch_entries(arch_list))


# The first CUDA release whose nvcc knows the arch-specific sm_90a target.
SM90A_MIN_NVCC = (12, 0)


def wgmma_plan(arch_list: str, nvcc: Optional[Tuple[int, int]] = None
               ) -> Tuple[Optional[str], str, str]:
    """``(CUTLASS include or None, arch list to build with, a sentence saying what was decided)``.

    nvcc: the (major, minor) release of the nvcc that will compile, when known.
    """
    include, how = find_cutlass_include()
    if include is None:
        return None, arch_list, f"wgmma sweep (csrc/{WGMMA_SOURCE}) not built: {how}"
    if nvcc is not None and tuple(nvcc) < SM90A_MIN_NVCC:
        return None, arch_list, (f"wgmma sweep (csrc/{WGMMA_SOURCE}) not built: nvcc "
                                 f"{nvcc[0]}.{nvcc[1]} has no sm_90a target (CUDA >= "
                                 f"{SM90A_MIN_NVCC[0]}.{SM90A_MIN_NVCC[1]} needed)")
    sm90a = with_sm90a(arch_list)
    if not any(e.startswith("9.0a") for e in sm90a.split(";")):
        return None, arch_list, (f"wgmma sweep (csrc/{WGMMA_SOURCE}) not built: "
                                 f"TORCH_CUDA_ARCH_LIST={arch_list!r} has no 9.0 entry")
    return include, sm90a, (f"wgmma sweep (csrc/{WGMMA_SOURCE}) built for sm_90a with the "
                            f"CUTLASS headers in {include} (from {how}); "
                            f"TORCH_CUDA_ARCH_LIST={sm90a}")


def cxx_flags(cutlass_include: Optional[str]) -> List[str]:
    return list(CXX_FLAGS) + ([WGMMA_DEFINE] if cutlass_include else [])


def nvcc_flags(cutlass_include: Optional[str], arch_list: str = "") -> List[str]:
    """nvcc flags; `arch_list` is the TORCH_CUDA_ARCH_LIST before wgmma_plan rewrote it."""
    if not cutlass_include:
        return list(NVCC_FLAGS)
    # CuTe needs constexpr host functions in device code (torch passes this flag too; repeated
    # here for older releases).
    flags = list(NVCC_FLAGS) + [WGMMA_DEFINE, f"-I{cutlass_include}", "--expt-relaxed-constexpr"]
    if "9.0+PTX" in _arch_entries(arch_list):
        flags.append(SM90_PORTABLE_PTX_FLAG)
    return flags

"""Where a benchmark ran: device, library versions, git commit, date (written into every CSV row)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Short commit of the checkout (``+dirty`` when tracked files changed).

    The GPU machine gets a copy of the working tree without ``.git``: there the commit comes from
    ``CLREG_BENCH_COMMIT`` (set it when launching the suite), else "unknown".
    """
    override = os.environ.get("CLREG_BENCH_COMMIT", "").strip()
    if override:
        return override
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return getattr(triton, "__version__", "unknown")


def _cuda_extension():
    """The loaded cuda extension, or None (no GPU, not built); never builds or raises."""
    try:
        if not torch.cuda.is_available():
            return None
        from clreg_fast.backends.cuda import load_extension

        return load_extension()[0]
    except Exception:
        return None


def cuda_loops() -> str:
    """Which kernel family the cuda backend runs with P <= 256: "wgmma" (the Hopper sweep for
    fp16/bf16, the default where it runs), "sweep" (the mma.sync tensor-core sweep for fp16/bf16
    elsewhere or with CLREG_FAST_CUDA_LOOPS=sm80, and the float32 sweep for float32) or "legacy"
    (CLREG_FAST_CUDA_LOOPS=legacy, which benchmarks/gpu_suite.sh sets when the sweeps fail their
    GPU tests). Asked of the extension for bf16 when one is loaded (csrc/bindings.cpp decides);
    otherwise read from the variable as the extension would on a GPU without the wgmma sweep.
    Recorded so that no number is credited to the wrong kernels."""
    ext = _cuda_extension()
    if ext is not None and hasattr(ext, "loops"):
        try:
            return str(ext.loops("bfloat16", 128))
        except Exception as exc:  # e.g. a misspelt CLREG_FAST_CUDA_LOOPS
            return f"error: {exc}"
    value = os.environ.get("CLREG_FAST_CUDA_LOOPS", "")
    return {"": "sweep", "auto": "sweep", "sm80": "sweep"}.get(value, value)


def cuda_wgmma() -> str:
    """Whether the loaded cuda extension has the wgmma sweep: "runs" (built, and this GPU runs
    its sm_90a code), "built" (not on this GPU), "not built", or "" without an extension."""
    ext = _cuda_extension()
    if ext is None:
        return ""
    if not getattr(ext, "wgmma_built", False):
        return "not built"
    try:
        return "runs" if ext.wgmma_available() else "built"
    except Exception as exc:
        return f"error: {exc}"


def collect(device: torch.device) -> Dict[str, str]:
    """Run-level metadata; every value a string so it goes into CSV cells unchanged."""
    from clreg_fast import __version__, available_backends

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "device": device_name(device),
        "device_type": device.type,
        "device_memory_gib": "",
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "cuda_version": str(torch.version.cuda or "none"),
        "python_version": platform.python_version(),
        "clreg_fast_version": __version__,
        "threads": str(torch.get_num_threads()),
        "backends": " ".join(available_backends()),
        "cuda_loops": cuda_loops(),
        "cuda_wgmma": cuda_wgmma(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
    return info


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '-', '.', '_')."""
    out = "".join(c if c.isalnum() or c in "-._" else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"

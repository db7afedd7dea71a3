"""Peak resident memory (RSS) of one CLReg forward + backward on CPU, in a fresh process.

CPU memory has no allocator statistics like CUDA's, so each measurement runs in its own child
process, which:

1. builds the inputs and runs one warm-up forward + backward (thread pools, lazy init,
   torch.compile), then drops the gradients;
2. reads VmRSS (the baseline: inputs, libraries), resets the peak with
   ``echo 5 > /proc/self/clear_refs`` and runs one forward + backward;
3. reads VmHWM (the peak RSS since the reset) and reports the increase over the baseline.

The child runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB: glibc then gives every
tensor of that size or more its own mapping and unmaps it when freed, so the baseline holds no
freed-but-kept heap from the warm-up and the peak follows the live tensors.

Use from Python::

    from clreg_fast.bench.peak_rss import measure_peak_rss
    r = measure_peak_rss("torch", nf=4096, nr=4096, d=256, p=128, dtype="fp32")
    r["status"], r["increase_bytes"]

or from a shell (prints one JSON object)::

    python benchmarks/peak_rss.py --provider reference --nf 4096 --nr 4096 --d 256 --p 128
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

RESULT_MARK = "CLREG_PEAK_RSS_RESULT "
MMAP_THRESHOLD = 128 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux")
    return int(match.group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _child(spec: dict) -> dict:
    """Runs in the child process: the measurement itself."""
    import torch

    from clreg_fast.bench.config import BenchConfig
    from clreg_fast.bench.measure import is_oom, short_error
    from clreg_fast.bench.providers import (availability, clear_grads, make_inputs, make_loss_fn,
                                            tensor_bytes)

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    config = BenchConfig.from_dict(spec["config"])
    provider = spec["provider"]
    device = torch.device("cpu")
    ok, why = availability(provider, device)
    if not ok:
        return {"status": "unavailable", "note": why}
    try:
        inputs = make_inputs(config, device, int(spec.get("seed", 0)))
        fn = make_loss_fn(provider, config)
        if spec.get("warmup", True):
            fn(inputs).backward()
        clear_grads(inputs)
        gc.collect()
        baseline = _status_kib("VmRSS")
        _reset_peak()
        loss = fn(inputs)
        after_fwd = _status_kib("VmRSS")
        peak_fwd = _status_kib("VmHWM")
        loss.backward()
        peak = _status_kib("VmHWM")
        value = float(loss.detach())
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"status": "OOM" if is_oom(exc) else "error", "note": short_error(exc)}
    kib = 1024
    return {
        "status": "ok", "note": "",
        "inputs_bytes": tensor_bytes(inputs),
        "baseline_rss_bytes": baseline * kib,
        "peak_rss_bytes": peak * kib,
        "increase_bytes": (peak - baseline) * kib,
        "fwd_increase_bytes": (peak_fwd - baseline) * kib,
        "saved_bytes": (after_fwd - baseline) * kib,
        "loss": value,
    }


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def run_child(spec: dict, timeout_s: float = 600.0) -> dict:
    """Run ``_child(spec)`` in a fresh interpreter; OOM kills and timeouts become statuses."""
    cmd = [sys.executable, "-m", "clreg_fast.bench.peak_rss", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=child_env(), cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"child process ran over {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):  # SIGKILL: the kernel's OOM killer, most likely
        return {"status": "OOM", "note": "child process was killed (SIGKILL, likely out of memory)"}
    tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"status": "error", "note": f"child exited with {proc.returncode}: {tail[-300:]}"}


def measure_peak_rss(provider: str, nf: int, nr: int, d: int, p: Optional[int],
                     dtype: str = "fp32", *, labels: bool = False, retain_detached: bool = False,
                     temperature: float = 0.1, seed: int = 0, warmup: bool = True,
                     threads: Optional[int] = None, timeout_s: float = 600.0) -> dict:
    """Peak RSS of one forward + backward of ``provider`` on CPU, measured in a child process.

    Args mirror :class:`clreg_fast.bench.config.BenchConfig` (``p=None``: no projection).

    Returns a dict with ``status`` ("ok", "OOM", "error", "timeout" or "unavailable"),
    ``note``, and when ok: ``increase_bytes`` (peak RSS during forward + backward minus RSS
    before it, i.e. over the inputs), ``peak_rss_bytes``, ``baseline_rss_bytes``,
    ``fwd_increase_bytes``, ``saved_bytes`` (held after the forward pass), ``inputs_bytes``
    and ``loss``.
    """
    from clreg_fast.bench.config import PROVIDERS, BenchConfig

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    config = BenchConfig(nf, nr, d, p, dtype, labels, retain_detached, temperature)
    spec = {"config": config.to_dict(), "provider": provider, "seed": seed, "warmup": warmup,
            "threads": threads}
    return run_child(spec, timeout_s)


def _parse_p(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "0") else int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--provider", default="torch")
    parser.add_argument("--nf", type=int, default=4096)
    parser.add_argument("--nr", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--p", type=_parse_p, default=128, help="projection size, or none")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--labels", action="store_true")
    parser.add_argument("--retain-detached", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    if args.child is not None:
        result = _child(json.loads(args.child))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    result = measure_peak_rss(args.provider, args.nf, args.nr, args.d, args.p, args.dtype,
                              labels=args.labels, retain_detached=args.retain_detached,
                              temperature=args.temperature, threads=args.threads,
                              warmup=not args.no_warmup)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

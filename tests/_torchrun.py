"""Launch a worker script under ``torchrun`` (2 gloo ranks on CPU) and read back what it saved."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script, args, out, extra_env=None, nproc=2, timeout=600):
    """Runs ``script args`` on ``nproc`` ranks and returns ``torch.load(out)``; a failed launch
    fails the test with the end of both output streams. Settings that a Trainer built earlier in
    this process may have exported (``ACCELERATE_*``) are kept out of the workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(extra_env or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        pytest.fail(f"torchrun {os.path.basename(str(script))} failed:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)

"""Bad input fails with a clear error that names the argument, before any kernel runs."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clreg_fast import CLRegLoss, clreg_loss_reference, fused_clreg_loss

F = torch.randn(6, 8)
R = torch.randn(4, 8)
W = torch.randn(5, 8)
B = torch.randn(5)

BAD = [
    # (description, args, kwargs, error type, words the message must contain)
    ("forget not a tensor", ([[1.0]], R), {}, TypeError, "forget"),
    ("forget 1-D", (torch.randn(6), R), {}, ValueError, "forget must be 2-D"),
    ("forget 3-D", (torch.randn(2, 3, 8), R), {}, ValueError, "forget must be 2-D"),
    ("forget integer", (torch.ones(6, 8, dtype=torch.long), None), {}, TypeError, "floating"),
    ("retain 1-D", (F, torch.randn(8)), {}, ValueError, "retain must be 2-D"),
    ("feature sizes differ", (F, torch.randn(4, 7)), {}, ValueError, "retain has feature size 7"),
    ("retain dtype", (F, R.double()), {}, TypeError, "retain has dtype"),
    ("weight shape", (F, R, torch.randn(5, 7)), {}, ValueError, "weight has shape"),
    ("weight 1-D", (F, R, torch.randn(8)), {}, ValueError, "weight must be 2-D"),
    ("weight dtype", (F, R, W.half()), {}, TypeError, "weight has dtype"),
    ("bias shape", (F, R, W, torch.randn(4)), {}, ValueError, "bias has shape"),
    ("bias without weight", (F, R, None, B), {}, ValueError, "bias was given without weight"),
    ("one forget row", (torch.randn(1, 8), R), {}, ValueError, "at least 2 rows"),
    ("labels length", (F, R), {"labels": torch.zeros(5, dtype=torch.long)}, ValueError,
     "labels has 5 entries"),
    ("labels float", (F, R), {"labels": torch.zeros(6)}, TypeError, "labels must be an integer"),
    ("labels bool", (F, R), {"labels": torch.zeros(6, dtype=torch.bool)}, TypeError,
     "labels must be an integer"),
    ("labels 2-D", (F, R), {"labels": torch.zeros(6, 1, dtype=torch.long)}, ValueError,
     "labels must be 1-D"),
    ("no positive", (F, R), {"labels": torch.arange(6)}, ValueError, "no forget row has a positive"),
    ("temperature 0", (F, R), {"temperature": 0.0}, ValueError, "temperature"),
    ("temperature negative", (F, R), {"temperature": -0.1}, ValueError, "temperature"),
    ("temperature nan", (F, R), {"temperature": math.nan}, ValueError, "temperature"),
    ("temperature inf", (F, R), {"temperature": math.inf}, ValueError, "temperature"),
    ("temperature tensor", (F, R), {"temperature": torch.tensor(0.1)}, TypeError, "temperature"),
    ("reduction", (F, R), {"reduction": "avg"}, ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("fn", [fused_clreg_loss, clreg_loss_reference],
                         ids=["fused", "reference"])
@pytest.mark.parametrize("what,args,kwargs,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(fn, what, args, kwargs, error, words):
    with pytest.raises(error, match=words):
        fn(*args, **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_clreg_loss(F, R, backend="tpu")


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fused_clreg_loss(F, R, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_on_kernel_backends(backend):
    with pytest.raises(TypeError, match="float64"):
        fused_clreg_loss(F.double(), R.double(), backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks tensors on another device")
def test_device_mismatch_names_argument():
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="retain is on meta"):
        fused_clreg_loss(F, meta)


def test_module_arguments():
    with pytest.raises(ValueError, match="in_features and out_features"):
        CLRegLoss(in_features=4)
    with pytest.raises(ValueError, match="temperature"):
        CLRegLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        CLRegLoss(reduction="max")


def run_python(code: str, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_triton_on_cpu_without_interpreter_says_how():
    out = run_python("""
        import warnings, torch
        import clreg_fast
        from clreg_fast.backends import _triton_kernels
        f = torch.randn(4, 3)
        if _triton_kernels()[0] is None:
            print("NO_TRITON")
        else:
            try:
                clreg_fast.fused_clreg_loss(f, None, backend="triton")
            except ValueError as e:
                print("ERR", e)
    """, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert "NO_TRITON" in out.stdout or ("ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout)


def test_import_without_triton_falls_back_with_message():
    out = run_python("""
        import sys, warnings
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, clreg_fast
        assert "triton" not in clreg_fast.available_backends()
        f = torch.randn(4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = clreg_fast.fused_clreg_loss(f, None, backend="triton")
        print("LOSS", float(loss))
        print("WARN", [str(w.message) for w in caught])
    """, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert "LOSS" in out.stdout
    assert "triton could not be imported" in out.stdout and "backend='torch'" in out.stdout

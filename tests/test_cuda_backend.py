"""The ``cuda`` backend (compiled extension clreg_fast._C).

GPU tests (marked ``gpu``) compare every primitive and ``fused_clreg_loss(backend="cuda")``
against float64 math on odd sizes, fp32/bf16/fp16, Nr = 0, Nf = 2, self_offset != 0 and
n_grad_cols = 0; they are skipped with the reason when no GPU or no extension is there. The CPU
tests check the loader, the registry and the build helpers on any machine.
"""
from __future__ import annotations

import importlib
import os
import stat

import pytest
import torch

import clreg_fast
from clreg_fast import available_backends, fused_clreg_loss
from clreg_fast._validation import check_inputs
from clreg_fast.backends.base import SimilarityKernels
from clreg_fast.backends.cuda import CudaKernels, build_env, load_extension
from clreg_fast.functional import apply_clreg
from clreg_fast.reference import _reference_impl


def _extension_or_reason():
    if not torch.cuda.is_available():
        return None, "needs a CUDA GPU (the cuda backend runs on GPUs only)"
    load_extension.cache_clear()
    return load_extension()


EXT, EXT_REASON = _extension_or_reason()
needs_cuda_ext = pytest.mark.skipif(EXT is None, reason=f"cuda backend unavailable: {EXT_REASON}")
gpu = [pytest.mark.gpu, needs_cuda_ext]

LOW_PRECISION = (torch.bfloat16, torch.float16)
# CLREG_FAST_CUDA_LOOPS for fp16/bf16 up to 256 features: "wgmma" (the Hopper sweep of
# csrc/sweep_wgmma.cu, the default where it runs; an error elsewhere), "sm80" (the mma.sync sweep
# of csrc/sweep_tc.cu, the default elsewhere) or "legacy" (lse_forward.cu / lse_backward.cu
# everywhere). float32 up to 256 features runs the float32 sweep (csrc/sweep_simt.cu) under
# every value but "legacy". What EXT.loops() then reports for fp16/bf16:
LOOPS = ("wgmma", "sm80", "legacy")
LOOPS_REPORTED = {"wgmma": "wgmma", "sm80": "sweep", "legacy": "legacy"}


def _wgmma_runs():
    return EXT is not None and bool(getattr(EXT, "wgmma_built", False)) and EXT.wgmma_available()


ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# CPU: loader, registry, bindings' checks, build helpers
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_loader_gives_a_reason_without_gpu():
    load_extension.cache_clear()
    ext, reason = load_extension()
    assert ext is None
    assert "no CUDA GPU is visible" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_available_backends_excludes_cuda_without_gpu():
    assert "cuda" not in available_backends()
    assert "cuda" not in clreg_fast.available_backends()


def test_backend_cuda_rejects_cpu_tensors():
    forget = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fused_clreg_loss(forget, None, backend="cuda")


def test_backend_cuda_rejects_float64():
    forget = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        fused_clreg_loss(forget, None, backend="cuda")


def test_kernels_reject_unsupported_dot_dtype():
    class NoExtension:
        def lse_forward(self, *args):
            raise AssertionError("the dtype check must come first")

    kernels = CudaKernels(NoExtension())
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        kernels.lse_forward(torch.zeros(2, 4), torch.zeros(2, 4), 0, 10.0, torch.float64)


def _built_extension():
    try:
        return importlib.import_module("clreg_fast._C")
    except ImportError as exc:
        pytest.skip(f"clreg_fast._C is not built here ({exc}); scripts/check_cuda_build.sh builds it")


def test_built_extension_checks_its_inputs_on_cpu():
    """The compiled module loads without a GPU and refuses CPU tensors with a clear error."""
    ext = _built_extension()
    assert ext.tile_size == 64
    za = torch.randn(3, 5)
    with pytest.raises(ValueError, match="za must be a CUDA tensor"):
        ext.lse_forward(za, za, 0, 10.0, "float32")
    with pytest.raises(ValueError, match="za must be a CUDA tensor"):
        ext.lse_backward(za, za, torch.zeros(3), torch.ones(3), 0, 10.0, 3, "bfloat16")


@pytest.mark.parametrize("value, mode", [("1", "force"), ("0", "skip"), ("", "auto"),
                                         ("auto", "auto"), ("true", "force"), ("off", "skip")])
def test_build_mode(monkeypatch, value, mode):
    monkeypatch.setenv(build_env.ENV_BUILD, value)
    assert build_env.build_mode() == mode


def test_build_mode_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv(build_env.ENV_BUILD, "maybe")
    with pytest.raises(ValueError, match=build_env.ENV_BUILD):
        build_env.build_mode()


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_toolkit(root, release="13.0"):
    """A directory tree with bin/nvcc that prints a version line like the real one."""
    (root / "bin").mkdir(parents=True)
    _executable(root / "bin" / "nvcc",
                f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    return root


def test_find_cuda_home_reads_through_a_wrapper_script(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    _executable(wrapper_dir / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    home, how = build_env.find_cuda_home()
    assert home == os.path.realpath(toolkit)
    assert "PATH" in how


def test_find_cuda_home_prefers_the_environment(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert build_env.find_cuda_home() == (str(toolkit), "$CUDA_HOME")


def test_toolkit_problems(tmp_path):
    assert "CPU-only" in build_env.toolkit_problem("/nowhere", None)
    assert "no CUDA toolkit" in build_env.toolkit_problem(None, "13.0")
    old = _fake_toolkit(tmp_path / "cuda-12", release="12.4")
    assert "does not match" in build_env.toolkit_problem(str(old), "13.0")
    assert build_env.toolkit_problem(str(old), "12.8") is None
    assert build_env.nvcc_version(str(old)) == (12, 4)


def _fake_cutlass(root, version=(4, 2)):
    for name in ("cute/tensor.hpp", "cutlass/cutlass.h"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("// stand-in\n")
    if version is not None:
        (root / "cutlass" / "version.h").write_text(
            f"#pragma once\n#define CUTLASS_MAJOR {version[0]}\n"
            f"#define CUTLASS_MINOR {version[1]}\n#define CUTLASS_PATCH 0\n")
    return root


def test_cutlass_include_is_found_from_the_variable_or_the_package(tmp_path, monkeypatch):
    include = _fake_cutlass(tmp_path / "include")
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(include))
    assert build_env.find_cutlass_include() == (str(include), f"${build_env.ENV_CUTLASS}")
    # A wrong path is an answer, not a reason to look elsewhere; "0" turns the wgmma build off.
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(tmp_path / "nowhere"))
    assert build_env.find_cutlass_include()[0] is None
    monkeypatch.setenv(build_env.ENV_CUTLASS, "0")
    found, why = build_env.find_cutlass_include()
    assert found is None and "off" in why
    # Unset: the installed cutlass_library package, found without importing it.
    monkeypatch.delenv(build_env.ENV_CUTLASS)
    package = tmp_path / "site" / "cutlass_library"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    _fake_cutlass(package / "source" / "include")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found, how = build_env.find_cutlass_include()
    assert found == str(package / "source" / "include") and "cutlass_library" in how


def test_wgmma_build_plan(tmp_path, monkeypatch):
    assert build_env.with_sm90a("8.0;9.0") == "8.0;9.0a"
    assert build_env.with_sm90a("8.0 9.0+PTX") == "8.0;9.0a"  # PTX: nvcc_flags(..., arch_list)
    assert build_env.with_sm90a("8.0;8.6;9.0a;10.0") == "8.0;8.6;9.0a;10.0"
    include = _fake_cutlass(tmp_path / "include")
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(include))
    found, arch, note = build_env.wgmma_plan("8.0;9.0")
    assert found == str(include) and arch == "8.0;9.0a" and "built for sm_90a" in note
    assert build_env.WGMMA_DEFINE in build_env.cxx_flags(found)
    assert f"-I{include}" in build_env.nvcc_flags(found)
    assert build_env.source_names(True)[-1] == build_env.WGMMA_SOURCE
    # No 9.0 entry, or no headers: no wgmma sweep, the arch list as it was.
    found, arch, note = build_env.wgmma_plan("8.0;8.6")
    assert found is None and arch == "8.0;8.6" and "no 9.0 entry" in note
    monkeypatch.setenv(build_env.ENV_CUTLASS, "0")
    found, arch, note = build_env.wgmma_plan("8.0;9.0")
    assert found is None and arch == "8.0;9.0" and "not built" in note
    assert build_env.WGMMA_SOURCE not in build_env.source_names(False)
    assert build_env.cxx_flags(None) == build_env.CXX_FLAGS


@pytest.mark.parametrize("version, usable", [((4, 2), True), ((4, 3), True), ((3, 4), False),
                                             ((4, 1), False), ((5, 0), False), (None, False)])
def test_cutlass_headers_of_an_untested_version_are_not_used(tmp_path, monkeypatch, version,
                                                             usable):
    # sweep_wgmma.cu is written against the CUTLASS 4.2 API; other headers would fail the
    # compile of the whole extension (no CUDA kernels at all), so the build goes on without wgmma.
    include = _fake_cutlass(tmp_path / "include", version)
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(include))
    found, why = build_env.find_cutlass_include()
    assert (found == str(include)) == usable, why
    if not usable:
        assert "version" in why
        found, arch, note = build_env.wgmma_plan("8.0;9.0")
        assert found is None and arch == "8.0;9.0" and "not built" in note


def test_wgmma_build_needs_an_nvcc_that_knows_sm_90a(tmp_path, monkeypatch):
    # sm_90a exists from CUDA 12.0; torch 2.6 also ships CUDA 11.8 builds, whose nvcc would fail
    # on "9.0a" (and with it the whole extension). The 9.0 entry then stays as it was.
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(_fake_cutlass(tmp_path / "include")))
    found, arch, note = build_env.wgmma_plan("8.0;9.0", nvcc=(11, 8))
    assert found is None and arch == "8.0;9.0" and "not built" in note and "11.8" in note
    found, arch, _ = build_env.wgmma_plan("8.0;9.0", nvcc=(12, 0))
    assert found is not None and arch == "8.0;9.0a"


def test_wgmma_build_keeps_the_portable_ptx_of_a_9_0_ptx_entry(tmp_path, monkeypatch):
    # "9.0+PTX" promises PTX that newer GPUs (sm_100, ...) compile at load time; compute_90a PTX
    # loads on sm_90a only, so the plan builds the sm_90a cubin plus compute_90 PTX.
    include = _fake_cutlass(tmp_path / "include")
    monkeypatch.setenv(build_env.ENV_CUTLASS, str(include))
    found, arch, note = build_env.wgmma_plan("8.0;9.0+PTX")
    assert found == str(include) and arch == "8.0;9.0a"
    flags = build_env.nvcc_flags(found, "8.0;9.0+PTX")
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert build_env.nvcc_flags(found, "8.0;9.0") == build_env.nvcc_flags(found)
    assert not any("compute_90" in f for f in build_env.nvcc_flags(found, "8.0;9.0"))
    assert build_env.nvcc_flags(None, "8.0;9.0+PTX") == build_env.NVCC_FLAGS
    # torch's own gencode flags for the planned list: an sm_90a cubin, no sm_90a-only PTX.
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
    torch_flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_90a,code=sm_90a" in torch_flags
    assert not any("code=compute_90a" in f for f in torch_flags + flags)


# --------------------------------------------------------------------------------------------
# GPU: primitives against float64 math on the same (rounded) operands
# --------------------------------------------------------------------------------------------

def _unit_rows(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    # Some structure: rows near each other give large similarities (the hard case for exp).
    x[: n // 2] += 2.0 * x[:1]
    return torch.nn.functional.normalize(x, dim=1).float().cuda()


def _rounded64(z, dot):
    """The operands the kernels multiply: z rounded to the dot dtype, in float64."""
    return z.to(dot).double()


def _scores64(za, zc, self_offset, scale, dot):
    s = _rounded64(za, dot) @ _rounded64(zc, dot).T * scale
    rows = torch.arange(za.shape[0], device=za.device)
    cols = rows + self_offset
    keep = (cols >= 0) & (cols < zc.shape[0])
    s[rows[keep], cols[keep]] = float("-inf")
    return s


def _rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# Tile rounding of the probabilities (bf16: 2^-9, fp16: 2^-12 relative) bounds the backward
# error; the forward multiplies exactly rounded operands with fp32 accumulation.
BACKWARD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}

SHAPES = [  # (Na, Nc, P, self_offset)
    (2, 2, 8, 0),           # smallest loss: one other column per anchor
    (37, 101, 19, 0),       # odd everything, P < one 32-feature chunk
    (64, 64, 64, 0),        # exactly one tile
    (65, 130, 129, 0),      # one past whole tiles in every dimension
    (30, 75, 40, 45),       # anchors are the last rows of the columns (distributed slice)
    (30, 75, 40, -7),       # negative offset: the first anchors have no left-out column
    (20, 50, 16, 1000),     # offset past the end: nothing left out
    (64, 3000, 48, 0),      # many column tiles: the sweep is split across blocks
    (700, 900, 300, 0),     # several anchor tiles and feature chunks of 64
    (100, 333, 128, 0),     # P = 128: the sweep's D = 128 exactly
    (70, 260, 200, 3),      # 128 < P <= 256: the sweep's D = 256, steps of 16 swept rows
    (129, 200, 256, 0),     # P = 256 exactly
    (256, 40000, 64, 0),    # few anchors against many columns: hundreds of splits
    (100, 120, 72, -63),    # D = 128 (3-stage ring), the left-out pair at a tile's column 0
    (30, 200, 40, 64),      # the left-out pair a whole tile to the right
    (20, 50, 16, 2 ** 40),  # 64-bit offset: nothing left out
]


@pytest.fixture(params=LOOPS)
def loops(request, monkeypatch):
    """Runs a test once per kernel family (the C++ glue reads the variable on every call)."""
    if request.param == "wgmma" and not _wgmma_runs():
        pytest.skip("the wgmma sweep does not run here (not built, or not a CC 9.0 GPU)")
    monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", request.param)
    return request.param


@pytest.mark.gpu
@needs_cuda_ext
def test_loops_selection(monkeypatch):
    monkeypatch.delenv("CLREG_FAST_CUDA_LOOPS", raising=False)
    sweep = "wgmma" if _wgmma_runs() else "sweep"  # the default sweep of this GPU
    assert EXT.loops("bfloat16", 128) == EXT.loops("float16", 1) == sweep
    assert EXT.loops("bfloat16", 256) == sweep and EXT.loops("bfloat16", 257) == "legacy"
    # float32: the SIMT sweep up to 256 features (exact float32 FMAs, no TF32), then the tiles.
    assert EXT.loops("float32", 1) == EXT.loops("float32", 256) == "sweep"
    assert EXT.loops("float32", 257) == "legacy"
    for value in ("auto", "sweep"):
        monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", value)
        assert EXT.loops("bfloat16", 128) == sweep
    monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", "sm80")
    assert EXT.loops("bfloat16", 128) == "sweep" and EXT.loops("float32", 64) == "sweep"
    monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", "wgmma")
    if _wgmma_runs():
        assert EXT.loops("bfloat16", 128) == "wgmma"
    else:
        with pytest.raises(RuntimeError, match="wgmma"):
            EXT.loops("bfloat16", 128)
    monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", "legacy")
    assert EXT.loops("bfloat16", 128) == EXT.loops("float32", 64) == "legacy"
    monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", "fast")
    with pytest.raises(ValueError, match="CLREG_FAST_CUDA_LOOPS"):
        EXT.loops("bfloat16", 128)
    # A misspelt value fails on every call, not only where the sweep could run.
    for dot, dim in [("float32", 64), ("bfloat16", 300)]:
        with pytest.raises(ValueError, match="CLREG_FAST_CUDA_LOOPS"):
            EXT.loops(dot, dim)


@pytest.mark.parametrize("dot", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.02])  # fixed shift and running maximum
@pytest.mark.gpu
@needs_cuda_ext
def test_lse_forward_matches_float64(dot, na, nc, p, off, tau, loops):
    if loops == "wgmma" and dot == torch.float32:
        pytest.skip("float32 runs the float32 sweep under wgmma and sm80 alike (covered by sm80)")
    za = _unit_rows(na, p, seed=na + p)
    zc = _unit_rows(nc, p, seed=nc + 1)
    if off == 0:
        zc[:na] = za if na <= nc else za[:nc]
    scale = 1.0 / tau
    lse = CudaKernels(EXT).lse_forward(za, zc, off, scale, dot)
    expected = torch.logsumexp(_scores64(za, zc, off, scale, dot), dim=1)
    assert lse.dtype == torch.float32 and lse.shape == (na,)
    # Products of rounded operands are exact in float32; what is left is the accumulation.
    atol = (2e-5 if dot == torch.float32 else 5e-5) * scale
    torch.testing.assert_close(lse.double(), expected, rtol=2e-5, atol=atol)


@pytest.mark.parametrize("dot", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("na, nc, p, off", SHAPES)
@pytest.mark.parametrize("grad_cols", ["all", "anchors", "none", "odd"])
@pytest.mark.gpu
@needs_cuda_ext
def test_lse_backward_matches_float64(dot, na, nc, p, off, grad_cols, loops):
    if loops == "wgmma" and dot == torch.float32:
        pytest.skip("float32 runs the float32 sweep under wgmma and sm80 alike (covered by sm80)")
    za = _unit_rows(na, p, seed=2 * na + p)
    zc = _unit_rows(nc, p, seed=3 * nc)
    scale = 10.0
    n_grad_cols = {"all": nc, "anchors": min(na, nc), "none": 0, "odd": max(1, nc // 3)}[grad_cols]
    s = _scores64(za, zc, off, scale, dot)
    lse = torch.logsumexp(s, dim=1).float()
    g = torch.Generator().manual_seed(na)
    w = (torch.rand(na, generator=g) - 0.3).float().cuda() / na  # mixed signs, tiny values
    w[::5] = 0.0                                                  # anchors without positives
    dza, dzc = CudaKernels(EXT).lse_backward(za, zc, lse, w, off, scale, n_grad_cols, dot)

    prob = torch.exp(s - lse.double()[:, None])  # 0 on the left-out pair (s = -inf)
    exp_dza = scale * w.double()[:, None] * (prob @ _rounded64(zc, dot))
    exp_dzc = scale * (prob * w.double()[:, None]).T[:n_grad_cols] @ _rounded64(za, dot)
    assert dza.shape == (na, p) and dzc.shape == (n_grad_cols, p)
    assert dza.dtype == dzc.dtype == torch.float32
    assert _rel_err(dza, exp_dza) < BACKWARD_TOL[dot]
    # Without the anchor pass: no dza, the same dzc.
    no_dza, dzc_only = CudaKernels(EXT).lse_backward(za, zc, lse, w, off, scale, n_grad_cols, dot,
                                                     need_dza=False)
    assert no_dza is None
    torch.testing.assert_close(dzc_only, dzc, rtol=0, atol=0)
    if n_grad_cols:
        assert _rel_err(dzc, exp_dzc) < BACKWARD_TOL[dot]
        # Column by column too: a wrong column would hide in the global norm.
        _assert_rows_close(dzc, exp_dzc, BACKWARD_TOL[dot])
    _assert_rows_close(dza, exp_dza, BACKWARD_TOL[dot])


def _assert_rows_close(got, want, tol):
    """Row by row: a wrong row or column would hide in the global norm."""
    norms = want.norm(dim=1)
    err = (got.double() - want).norm(dim=1)
    bound = 4 * tol * norms + 1e-2 * tol * norms.max() + 1e-12
    assert (err <= bound).all(), f"rows {torch.nonzero(err > bound).flatten().tolist()[:10]}"


@pytest.mark.parametrize("dot", ALL_DTYPES, ids=str)
@pytest.mark.gpu
@needs_cuda_ext
def test_lse_backward_is_deterministic(dot, loops):
    za = _unit_rows(200, 72, seed=1)
    zc = torch.cat([za, _unit_rows(2500, 72, seed=2)])
    kernels = CudaKernels(EXT)
    lse = kernels.lse_forward(za, zc, 0, 10.0, dot)
    w = torch.full((200,), 1 / 200, device="cuda")
    first = kernels.lse_backward(za, zc, lse, w, 0, 10.0, zc.shape[0], dot)
    second = kernels.lse_backward(za, zc, lse, w, 0, 10.0, zc.shape[0], dot)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dot", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("na, nc, p, off", [(37, 101, 19, 0), (65, 130, 129, 0), (30, 75, 40, 45),
                                            (256, 9000, 200, 0)])
@pytest.mark.gpu
@needs_cuda_ext
def test_sweep_and_legacy_kernels_agree(dot, na, nc, p, off, monkeypatch):
    """Both families round the same operands: their results differ by float32 accumulation
    order and, in the backward, by the rare probability that rounds the other way."""
    za = _unit_rows(na, p, seed=11)
    zc = _unit_rows(nc, p, seed=12)
    w = torch.linspace(-1, 1, na, device="cuda") / na
    out = {}
    for name in LOOPS:
        if name == "wgmma" and not _wgmma_runs():
            continue
        monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", name)
        assert EXT.loops(_DOT_NAME[dot], p) == LOOPS_REPORTED[name]
        kernels = CudaKernels(EXT)
        lse = kernels.lse_forward(za, zc, off, 10.0, dot)
        out[name] = (lse, *kernels.lse_backward(za, zc, lse, w, off, 10.0, nc, dot))
    for name in out:
        if name == "legacy":
            continue
        torch.testing.assert_close(out[name][0], out["legacy"][0], rtol=1e-5, atol=1e-4)
        for got, want in zip(out[name][1:], out["legacy"][1:]):
            assert _rel_err(got, want) < BACKWARD_TOL[dot]


@pytest.mark.gpu
@needs_cuda_ext
def test_wgmma_sweep_runs_on_hopper_when_built():
    """A CC 9.0 GPU with a module built with the CUTLASS headers must run the wgmma sweep (the
    probe finds the sm_90a code); elsewhere it must say it does not."""
    cc = torch.cuda.get_device_capability()
    built = bool(getattr(EXT, "wgmma_built", False))
    assert EXT.wgmma_available() == (built and cc == (9, 0))
    if not built:
        pytest.skip("the module was built without the CUTLASS headers (no wgmma sweep)")


_DOT_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# Odd sizes for the float32 sweep (csrc/sweep_simt.cu) at D = 64, 128 and 256: features not a
# multiple of 4 (the padded operand copy) and of 4 (read in place), one-row last tiles, the
# left-out pair at offsets inside, at the edge of and past the steps of 4096 / D swept rows.
SIMT_SHAPES = [  # (Na, Nc, P, self_offset)
    (37, 101, 19, 0),
    (65, 130, 129, 0),
    (30, 75, 40, 45),
    (33, 97, 256, -1),
    (70, 150, 128, 100),
    (20, 70, 200, 0),
    (129, 1000, 100, -63),
    (256, 9000, 64, 0),
]


@pytest.mark.parametrize("na, nc, p, off", SIMT_SHAPES)
@pytest.mark.parametrize("n_grad", ["all", "odd"])
@pytest.mark.gpu
@needs_cuda_ext
def test_float32_sweep_matches_reference_and_legacy(na, nc, p, off, n_grad, monkeypatch):
    """The float32 sweep against float64 math and against the SIMT tile kernels (legacy): both
    are plain float32 FMAs in another order, so all three agree to float32 accumulation error.
    The longer sweeps (Nc = 1000, 9000) are cut into several splits by the GPU's split policy."""
    za = _unit_rows(na, p, seed=21)
    zc = _unit_rows(nc, p, seed=22)
    if off == 0:
        zc[: min(na, nc)] = za[: min(na, nc)]
    n_grad_cols = nc if n_grad == "all" else max(1, nc // 3)
    w = torch.linspace(-1, 1, na, device="cuda") / na
    s = _scores64(za, zc, off, 10.0, torch.float32)
    lse64 = torch.logsumexp(s, dim=1)
    prob = torch.exp(s - lse64[:, None])
    exp_dza = 10.0 * w.double()[:, None] * (prob @ zc.double())
    exp_dzc = 10.0 * (prob * w.double()[:, None]).T[:n_grad_cols] @ za.double()
    out = {}
    # "sm80" (like "wgmma" or unset) runs the float32 sweep; "legacy" the tile kernels.
    for value, name in (("sm80", "sweep"), ("legacy", "legacy")):
        monkeypatch.setenv("CLREG_FAST_CUDA_LOOPS", value)
        assert EXT.loops("float32", p) == name
        kernels = CudaKernels(EXT)
        lse = kernels.lse_forward(za, zc, off, 10.0, torch.float32)
        torch.testing.assert_close(lse.double(), lse64, rtol=2e-5, atol=2e-4)
        dza, dzc = kernels.lse_backward(za, zc, lse64.float(), w, off, 10.0, n_grad_cols,
                                        torch.float32)
        _assert_rows_close(dza, exp_dza, BACKWARD_TOL[torch.float32])
        _assert_rows_close(dzc, exp_dzc, BACKWARD_TOL[torch.float32])
        out[name] = (lse, dza, dzc)
    torch.testing.assert_close(out["sweep"][0], out["legacy"][0], rtol=1e-5, atol=1e-4)
    for got, want in zip(out["sweep"][1:], out["legacy"][1:]):
        assert _rel_err(got, want) < BACKWARD_TOL[torch.float32]


@pytest.mark.parametrize("dot", ALL_DTYPES, ids=str)
@pytest.mark.gpu
@needs_cuda_ext
def test_primitives_accept_strided_and_misaligned_inputs(dot, loops):
    za = _unit_rows(40, 24, seed=5)
    zc = _unit_rows(90, 24, seed=6)
    kernels = CudaKernels(EXT)
    lse = kernels.lse_forward(za, zc, 0, 10.0, dot)
    lse_t = kernels.lse_forward(za.T.contiguous().T, zc.T.contiguous().T, 0, 10.0, dot)
    assert torch.equal(lse_t, lse)
    # Rows starting 4 bytes past a 16-byte boundary take the scalar-load path: same numbers.
    buf_a = torch.empty(za.numel() + 1, device="cuda")
    buf_c = torch.empty(zc.numel() + 1, device="cuda")
    za_odd = buf_a[1:].view_as(za).copy_(za)
    zc_odd = buf_c[1:].view_as(zc).copy_(zc)
    torch.testing.assert_close(kernels.lse_forward(za_odd, zc_odd, 0, 10.0, dot), lse,
                               rtol=1e-6, atol=1e-6)
    w = torch.linspace(-1, 1, 40, device="cuda")
    aligned = kernels.lse_backward(za, zc, lse, w, 0, 10.0, 90, dot)
    odd = kernels.lse_backward(za_odd, zc_odd, lse, w, 0, 10.0, 90, dot)
    for got, want in zip(odd, aligned):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda_ext
def test_primitives_accept_one_row_tensors_with_any_row_stride(loops):
    """torch counts a one-row tensor as contiguous whatever its stride(0): 1 for a transposed
    column, 66 for one row narrowed from a 66-wide tensor. The float32 sweep once took
    stride(0) as its row stride and refused both (launch_sweep_simt: invalid argument)."""
    zc = _unit_rows(90, 64, seed=7)
    row = zc[:1].clone()
    transposed = torch.empty(64, 1, device="cuda").copy_(row.T).t()
    wide = torch.zeros(4, 66, device="cuda")
    wide[2, :64] = row[0]
    narrowed = wide[2:3, :64]
    assert transposed.stride() == (1, 1) and narrowed.stride() == (66, 1)
    kernels = CudaKernels(EXT)
    w = torch.ones(1, device="cuda")
    w5 = torch.linspace(-1, 1, 5, device="cuda")
    for dot in ALL_DTYPES:
        lse = kernels.lse_forward(row, zc, 0, 10.0, dot)  # the row is column 0: left out
        grads = kernels.lse_backward(row, zc, lse, w, 0, 10.0, 90, dot)
        lse_cols = kernels.lse_forward(zc[:5], row, 1000, 10.0, dot)  # the row as the columns
        grads_cols = kernels.lse_backward(zc[:5], row, lse_cols, w5, 1000, 10.0, 1, dot)
        for one_row in (transposed, narrowed):
            torch.testing.assert_close(kernels.lse_forward(one_row, zc, 0, 10.0, dot), lse,
                                       rtol=1e-6, atol=1e-6)
            got = kernels.lse_backward(one_row, zc, lse, w, 0, 10.0, 90, dot)
            got_cols = kernels.lse_backward(zc[:5], one_row, lse_cols, w5, 1000, 10.0, 1, dot)
            torch.testing.assert_close(kernels.lse_forward(zc[:5], one_row, 1000, 10.0, dot),
                                       lse_cols, rtol=1e-6, atol=1e-6)
            for g, want in zip(got + got_cols, grads + grads_cols):
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU: fused_clreg_loss(backend="cuda") against the float64 reference
# --------------------------------------------------------------------------------------------

FUSED_CASES = [  # (Nf, Nr, D, P or None, n_labels, bias, tau)
    (2, 0, 8, None, 1, False, 0.1),       # Nf = 2, Nr = 0, no projection
    (37, 29, 50, 19, 3, True, 0.1),       # odd sizes, projection with bias, 3 concepts
    (70, 0, 33, 130, 2, False, 0.07),     # Nr = 0, P past two tiles
    (65, 130, 96, 64, 4, True, 0.02),     # small tau: running-maximum log-sum-exp
    (9, 200, 40, None, 4, False, 0.1),    # Nr >> Nf, some concepts without a positive
]


def _fused_inputs(nf, nr, d, p, n_labels, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    forget = torch.randn(nf, d, generator=g)
    forget[: nf // 2] += forget[:1].clone()  # a tight cluster: large similarities
    retain = torch.randn(nr, d, generator=g)
    weight = torch.randn(p, d, generator=g) / d ** 0.5 if p else None
    b = torch.randn(p, generator=g) * 0.1 if (p and bias) else None
    labels = torch.randint(0, n_labels, (nf,), generator=g)
    if n_labels < nf:
        labels[:2] = 0  # at least one anchor with a positive
    else:
        labels = torch.arange(nf)
    to = dict(device="cuda", dtype=dtype)
    tensors = [forget.to(**to), retain.to(**to),
               weight.to(**to) if weight is not None else None, b.to(**to) if b is not None else None]
    return [t.requires_grad_() if t is not None else None for t in tensors], labels.cuda()


def _loss_and_grads(fn, tensors, labels, tau, reduction, upstream, **kw):
    forget, retain, weight, bias = [t.detach().clone().requires_grad_() if t is not None else None
                                    for t in tensors]
    loss = fn(forget, retain, weight, bias, labels=labels, temperature=tau, reduction=reduction, **kw)
    out = (loss * upstream).sum() if reduction == "none" else loss
    leaves = [t for t in (forget, retain, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
    return loss.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


class _Float64Kernels(SimilarityKernels):
    """The kernels' rounding, emulated: float64 math on operands and probability tiles rounded
    to the dot dtype exactly where the kernels round them (csrc/lse_backward.cu).

    Run through the same autograd function as the cuda backend, this isolates the kernels' own
    error (float32 accumulation) from the dtype's rounding, which a low-precision plain
    reference cannot separate, and which can dwarf a gradient whose terms cancel (Nf = 2).
    """

    name = "float64-emulation"
    rounds_dot_operands = True  # the positive term then sees the same rounded operands

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        return torch.logsumexp(_scores64(za, zc, self_offset, scale, dot_dtype), dim=1).float()

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype=torch.float32,
                     need_dza=True):
        prob = torch.exp(_scores64(za, zc, self_offset, scale, dot_dtype) - lse.double()[:, None])
        tile_scale = 4096.0 if dot_dtype == torch.float16 else 1.0  # kFp16ProbScale
        w = w.double()
        dza = _rounded64(prob * tile_scale, dot_dtype) @ _rounded64(zc, dot_dtype)
        dza *= (scale / tile_scale) * w[:, None]
        w_max = w.abs().max().clamp_min(1e-30)
        g_cols = _rounded64(prob * (w / w_max)[:, None] * tile_scale, dot_dtype)
        dzc = g_cols.T[:n_grad_cols] @ _rounded64(za, dot_dtype) * (scale * w_max / tile_scale)
        return (dza.float() if need_dza else None), dzc.float()


def _emulated_loss(forget, retain, weight, bias, *, labels, temperature, reduction):
    groups = check_inputs(forget, retain, weight, bias, labels, temperature, reduction)
    if retain is None:
        retain = forget.new_zeros((0, forget.shape[1]))
    return apply_clreg(forget, retain, weight, bias, groups, temperature, reduction,
                       _Float64Kernels())


def _reference(dtype):
    def fn(forget, retain, weight, bias, *, labels, temperature, reduction):
        return _reference_impl(forget, retain, weight, bias, labels, temperature, reduction,
                               compute_dtype=dtype)
    return fn


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "nf{}-nr{}-d{}-p{}".format(*c[:4]))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.gpu
@needs_cuda_ext
def test_fused_loss_matches_reference(dtype, case, reduction):
    nf, nr, d, p, n_labels, bias, tau = case
    tensors, labels = _fused_inputs(nf, nr, d, p, n_labels, bias, dtype, seed=nf * 7 + nr)
    upstream = torch.rand(nf, device="cuda")
    loss, grads = _loss_and_grads(fused_clreg_loss, tensors, labels, tau, reduction, upstream,
                                  backend="cuda")
    # Gold: the definition in float64 on the same (already rounded) inputs.
    gold_inputs = [t.double() if t is not None else None for t in tensors]
    gold_loss, gold_grads = _loss_and_grads(_reference(torch.float64), gold_inputs, labels, tau,
                                            reduction, upstream.double())
    assert loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), gold_loss, rtol=1e-4, atol=1e-5)
        for got, want in zip(grads, gold_grads):
            assert _rel_err(got, want) < 1e-4 or (got - want).abs().max() < 1e-6
        return
    # Low precision: the similarities are rounded to the dtype by design, so the kernels are
    # held to float64 math on the same rounded operands, through the same autograd function.
    emu_loss, emu_grads = _loss_and_grads(_emulated_loss, tensors, labels, tau, reduction, upstream)
    torch.testing.assert_close(loss, emu_loss, rtol=1e-4, atol=5e-5 / tau)
    eps = torch.finfo(dtype).eps
    for got, want in zip(grads, emu_grads):
        if want.numel() == 0:  # retain with Nr = 0
            continue
        # Left: float32 accumulation, the rare tile element that rounds the other way, and
        # the rounding of the result to the input dtype.
        err = (got.double() - want.double()).abs().max()
        assert err <= (2 * eps + 1e-3) * want.double().abs().max() + 1e-6
    # And the whole still agrees with the float64 definition up to the dtype's rounding of
    # the similarities (|ds| <= 2 eps for unit rows: each anchor's loss moves by at most
    # 4 eps / tau; a sum adds up to nf of them).
    terms = nf if reduction == "sum" else 1
    assert (loss.double() - gold_loss).abs().max() <= terms * 4 * eps / tau + 1e-4


@pytest.mark.gpu
@needs_cuda_ext
def test_detached_retain_skips_retain_gradients():
    (forget, retain, weight, _), labels = _fused_inputs(33, 40, 24, 16, 2, False, torch.float32, 3)
    loss = fused_clreg_loss(forget, retain.detach(), weight, labels=labels, backend="cuda")
    loss.backward()
    gold = _reference_impl(forget.double(), retain.detach().double(), weight.double(), None, labels,
                           0.1, "mean", compute_dtype=torch.float64)
    torch.testing.assert_close(loss.double(), gold, rtol=1e-4, atol=1e-5)
    assert retain.grad is None and forget.grad is not None and weight.grad is not None


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_is_listed_and_auto_picks_it():
    assert "cuda" in available_backends()
    from clreg_fast.backends import resolve_backend

    assert resolve_backend("auto", torch.zeros(1, device="cuda")).name == "cuda"

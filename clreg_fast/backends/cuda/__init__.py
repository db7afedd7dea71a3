"""``cuda`` backend: the compiled CUDA C++ extension ``clreg_fast._C`` (csrc/).

Kernels (docs/cuda_backend.md): bf16/fp16 inputs with up to 256 features run the tensor-core
sweep of csrc/sweep_tc.cu (operands rounded once in global memory, cp.async pipeline, mma.sync
with float32 accumulation, backward accumulators in registers, written once); float32 inputs
with up to 256 features the float32 sweep of csrc/sweep_simt.cu (the same loop with SIMT float32
FMAs, no TF32); wider inputs run WMMA tiles (bf16/fp16) or SIMT float32 tiles (csrc/tiles.cuh).
``CLREG_FAST_CUDA_LOOPS=legacy`` selects the WMMA/SIMT tile kernels everywhere. The forward keeps an
online log-sum-exp per anchor; the backward recomputes the probability tiles from it in a row
pass (anchor gradients) and a column pass (column gradients), without atomics, so results are
deterministic. Needs compute capability 8.0+ (A100, H100/H200); built for sm_80 and sm_90.

The extension comes from ``pip install . --no-build-isolation`` (or ``python setup.py
build_ext --inplace``); when it is missing, the first use on a GPU machine with a CUDA toolkit
builds it just in time with ``torch.utils.cpp_extension.load`` (cached for later runs).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Tuple

import torch

from clreg_fast.backends.base import SimilarityKernels, tracing
from clreg_fast.backends.cuda import build_env

logger = logging.getLogger("clreg_fast")

_DOT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JIT_NAME = "clreg_fast_C"


def _kernel_sources_dir() -> Optional[str]:
    """csrc/ of a source checkout, else the copy that setup.py ships as clreg_fast/_csrc."""
    for candidate in (os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"),
                      os.path.join(_PACKAGE_DIR, "_csrc")):
        if all(os.path.isfile(p) for p in build_env.source_paths(candidate)):
            return candidate
    return None


def jit_build_directory() -> str:
    """Cache of the just-in-time build: $CLREG_FAST_EXTENSIONS_DIR or ~/.cache/clreg_fast/..."""
    root = os.environ.get("CLREG_FAST_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "clreg_fast")
    tag = f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}".replace(".", "")
    return os.path.join(root, tag)


def _jit_build(import_error: str):
    """Build the extension with torch.utils.cpp_extension.load; ``(module, None)`` or ``(None, why)``."""
    not_built = f"clreg_fast._C is not built ({import_error})"
    try:
        mode = build_env.build_mode()
    except ValueError as exc:
        return None, str(exc)
    if mode == "skip":
        return None, f"{not_built} and {build_env.ENV_BUILD}=0 turns off the just-in-time build"
    cuda_home, how = build_env.find_cuda_home()
    problem = build_env.toolkit_problem(cuda_home, torch.version.cuda)
    if problem:
        return None, (f"{not_built} and it cannot be built just in time: {problem}. Install "
                      "with `pip install . --no-build-isolation` on a machine with the CUDA "
                      "toolkit")
    sources_dir = _kernel_sources_dir()
    if sources_dir is None:
        return None, f"{not_built} and its CUDA sources (csrc/) are not part of this install"
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME != cuda_home:  # imported earlier, with torch's own guess
        cpp_extension.CUDA_HOME = cuda_home
    build_dir = jit_build_directory()
    os.makedirs(build_dir, exist_ok=True)
    # The arch list torch would use (the visible GPUs when unset), with 9.0 built as sm_90a when
    # the CUTLASS headers are there (the wgmma sweep).
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    arch_list = arch_env or ";".join(sorted({
        "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    requested_arch_list = arch_list
    cutlass, arch_list, wgmma_note = build_env.wgmma_plan(arch_list,
                                                          build_env.nvcc_version(cuda_home))
    if not os.path.isfile(os.path.join(sources_dir, build_env.WGMMA_SOURCE)):
        # no wgmma sweep after all: the arch list as requested (a 9.0+PTX keeps its PTX)
        cutlass, arch_list = None, requested_arch_list
        wgmma_note = f"wgmma sweep not built: no {build_env.WGMMA_SOURCE} in {sources_dir}"
    logger.warning("clreg_fast: building the CUDA extension with nvcc from %s (first use only, "
                   "a few minutes) in %s; %s", cuda_home, build_dir, wgmma_note)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=build_env.source_paths(sources_dir, with_wgmma=cutlass is not None),
            extra_include_paths=[sources_dir],
            extra_cflags=build_env.cxx_flags(cutlass),
            extra_cuda_cflags=build_env.nvcc_flags(cutlass, requested_arch_list),
            build_directory=build_dir,
            verbose=os.environ.get("CLREG_FAST_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as exc:  # compiler missing or failing: report, never crash the caller
        return None, f"{not_built} and the just-in-time build in {build_dir} failed: {exc}"
    finally:
        if arch_env is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_env
    return module, None


@functools.lru_cache(maxsize=None)
def load_extension() -> Tuple[Optional[object], Optional[str]]:
    """The extension module, or ``(None, reason)`` when the cuda backend cannot run here.

    Needs a visible GPU of compute capability 8.0+. Takes the installed ``clreg_fast._C``; when
    it is missing or does not load (e.g. built for another torch), builds it just in time if a
    CUDA toolkit matching torch is found (unless CLREG_FAST_CUDA_BUILD=0).
    """
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch {torch.__version__}"
        return None, f"no CUDA GPU is visible (torch.cuda.is_available() is False with {build})"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return None, (f"the CUDA kernels need compute capability 8.0+ (A100, H100), the GPU "
                      f"{torch.cuda.get_device_name()} has {major}.{minor}")
    try:
        from clreg_fast import _C  # noqa: F401  (built by setup.py)

        return _C, None
    except ImportError as exc:
        import_error = str(exc)
    return _jit_build(import_error)


_FAKES_REGISTERED = False


def register_fake_impls() -> bool:
    """Shape-only implementations of ``torch.ops.clreg_fast.cuda_*`` (defined in csrc/torch_ops.cpp)
    for FakeTensor tracing; False when the loaded extension predates the operators."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return True
    namespace = torch.ops.clreg_fast
    if not (hasattr(namespace, "cuda_lse_forward") and hasattr(namespace, "cuda_lse_backward")):
        return False

    @torch.library.register_fake("clreg_fast::cuda_lse_forward")
    def _(za, zc, self_offset, scale, dot_dtype):
        return za.new_empty((za.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("clreg_fast::cuda_lse_backward")
    def _(za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype, need_dza):
        rows = za.shape[0] if need_dza else 0
        return (za.new_empty((rows, za.shape[1]), dtype=torch.float32),
                za.new_empty((n_grad_cols, za.shape[1]), dtype=torch.float32))

    _FAKES_REGISTERED = True
    return True


class CudaKernels(SimilarityKernels):
    """The similarity primitives of ``backends/base.py`` on the compiled CUDA kernels.

    Eager calls go through the pybind11 functions; traced calls (torch.compile) through the
    operators ``torch.ops.clreg_fast.cuda_lse_forward``/``cuda_lse_backward``.
    """

    name = "cuda"
    rounds_dot_operands = True

    def __init__(self, extension):
        self._ext = extension
        self.has_ops = register_fake_impls()

    @staticmethod
    def _dot_name(dot_dtype) -> str:
        try:
            return _DOT_NAMES[dot_dtype]
        except KeyError:
            raise TypeError(f"backend='cuda' takes fp16, bf16 or fp32 inputs, got dot_dtype="
                            f"{dot_dtype}") from None

    def _check_ops(self):
        if not self.has_ops:
            raise RuntimeError("torch.compile with backend='cuda' needs the operators of "
                               "csrc/torch_ops.cpp; this build of clreg_fast._C predates them: "
                               "rebuild it (pip install . --no-build-isolation)")

    def lse_forward(self, za, zc, self_offset, scale, dot_dtype=torch.float32):
        if tracing():
            self._check_ops()
            return torch.ops.clreg_fast.cuda_lse_forward(za, zc, self_offset, float(scale),
                                                         self._dot_name(dot_dtype))
        return self._ext.lse_forward(za, zc, int(self_offset), float(scale),
                                     self._dot_name(dot_dtype))

    def lse_backward(self, za, zc, lse, w, self_offset, scale, n_grad_cols, dot_dtype=torch.float32,
                     need_dza=True):
        if tracing():
            self._check_ops()
            dza, dzc = torch.ops.clreg_fast.cuda_lse_backward(
                za, zc, lse, w, self_offset, float(scale), n_grad_cols, self._dot_name(dot_dtype),
                bool(need_dza))
            return (dza if need_dza else None), dzc
        dza, dzc = self._ext.lse_backward(za, zc, lse, w, int(self_offset), float(scale),
                                          int(n_grad_cols), self._dot_name(dot_dtype),
                                          bool(need_dza))
        return (dza if need_dza else None), dzc


__all__ = ["CudaKernels", "load_extension", "jit_build_directory", "register_fake_impls"]

"""Install clreg_fast, with the CUDA extension clreg_fast._C when it can be built.

The extension (csrc/) is compiled with nvcc and ninja when torch is a CUDA build, importable at
build time, and a matching CUDA toolkit is found; otherwise the pure-Python package is installed
and a line says why. CLREG_FAST_CUDA_BUILD=1 forces the build (and fails if it is impossible),
CLREG_FAST_CUDA_BUILD=0 skips it. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100/H200).
With the CUTLASS headers (`pip install --no-deps nvidia-cutlass==4.2.0.0`, or
CLREG_FAST_CUTLASS_INCLUDE=DIR) the Hopper wgmma sweep (csrc/sweep_wgmma.cu) is built too and the
9.0 entry is compiled as sm_90a; without them the build goes on without it and says so.

    pip install . --no-build-isolation      # with the CUDA build of torch already installed
    CLREG_FAST_CUDA_BUILD=1 python setup.py build_ext --inplace

pip's default build isolation hides the installed torch from this script, so a plain
``pip install .`` installs the pure-Python package; the cuda backend then builds the extension
just in time on the first use on a GPU machine (torch.utils.cpp_extension.load).
"""
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _load_build_env():
    """clreg_fast/backends/cuda/build_env.py, loaded by path (the package imports torch)."""
    path = os.path.join(HERE, "clreg_fast", "backends", "cuda", "build_env.py")
    spec = importlib.util.spec_from_file_location("_clreg_fast_build_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_env = _load_build_env()


def _say(message: str) -> None:
    print(f"clreg_fast setup: {message}", file=sys.stderr)


class BuildPyWithKernelSources(build_py):
    """Also ship csrc/ as clreg_fast/_csrc, the sources of the just-in-time build."""

    def run(self):
        super().run()
        src_dir = os.path.join(HERE, CSRC)
        if not os.path.isdir(src_dir):
            return
        dst_dir = os.path.join(self.build_lib, "clreg_fast", "_csrc")
        os.makedirs(dst_dir, exist_ok=True)
        for name in build_env.SOURCES + build_env.HEADERS + (build_env.WGMMA_SOURCE,):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def cuda_extension_or_reason():
    """``((extension, build_ext command), None)``, or ``(None, why the extension is not built)``."""
    mode = build_env.build_mode()
    if mode == "skip":
        return None, f"{build_env.ENV_BUILD}=0"
    try:
        import torch
    except ImportError:
        return None, ("torch is not importable at build time (pip's build isolation hides it; "
                      "install torch first, then `pip install . --no-build-isolation`)")
    cuda_home, how = build_env.find_cuda_home()
    problem = build_env.toolkit_problem(cuda_home, torch.version.cuda)
    if problem:
        return None, problem
    # torch.utils.cpp_extension reads these when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_env.DEFAULT_ARCH_LIST)
    # With the CUTLASS headers the 9.0 entry becomes 9.0a (the wgmma kernels need sm_90a).
    requested_arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    cutlass, arch_list, wgmma_note = build_env.wgmma_plan(requested_arch_list,
                                                          build_env.nvcc_version(cuda_home))
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    _say(wgmma_note)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _say(f"building {build_env.EXTENSION_NAME} with CUDA_HOME={cuda_home} (from {how}) for "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS="
         f"{os.environ.get('MAX_JOBS', 'all cores')}")
    class BuildCudaExtension(BuildExtension.with_options(use_ninja=True)):
        """torch's build_ext, with compiler failures reported the way setuptools expects, so
        that an optional extension (auto mode) is skipped with a warning instead of failing."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except RuntimeError as exc:
                from setuptools.errors import CompileError

                # A module left by an earlier build must not be installed in place of this one.
                stale = self.get_ext_fullpath(ext.name)
                if os.path.exists(stale):
                    os.remove(stale)
                if ext.optional:
                    _say(f"the CUDA extension failed to build ({exc}); installing without it. "
                         f"{build_env.ENV_BUILD}=1 turns this into an error.")
                raise CompileError(str(exc)) from exc

    ext = CUDAExtension(
        name=build_env.EXTENSION_NAME,
        sources=[os.path.join(CSRC, name) for name in build_env.source_names(cutlass is not None)],
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args={"cxx": build_env.cxx_flags(cutlass),
                            "nvcc": build_env.nvcc_flags(cutlass, requested_arch_list)},
    )
    # Without a forced build a failed compile leaves the pure-Python package installed.
    ext.optional = mode == "auto"
    return (ext, BuildCudaExtension), None


built, reason = cuda_extension_or_reason()
if built is None:
    if build_env.build_mode() == "force":
        sys.exit(f"clreg_fast setup: {build_env.ENV_BUILD}=1 but the CUDA extension cannot be "
                 f"built: {reason}")
    _say(f"installing the pure-Python package without the CUDA extension: {reason}")
    ext_modules, cmdclass = [], {"build_py": BuildPyWithKernelSources}
else:
    ext_modules = [built[0]]
    cmdclass = {"build_py": BuildPyWithKernelSources, "build_ext": built[1]}

setup(
    name="clreg_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for the CLReg contrastive unlearning regularizer",
    packages=find_packages(include=["clreg_fast", "clreg_fast.*"]),
    package_data={"clreg_fast.backends.triton": ["tuned/*.json"]},  # measured launch tables
    python_requires=">=3.9",
    entry_points={"console_scripts": ["clreg-unlearn=clreg_fast.unlearn.cli:main"]},
    # torch 2.4/2.5 (OpenUnlearning pins 2.4.1): reference and torch backends, CLRegMixin, the
    # cross-rank loss; torch.compile, triton and the CUDA extension need torch >= 2.6.
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "unlearn": ["transformers>=4.45", "safetensors", "tqdm", "matplotlib", "scipy", "gguf",
                    "accelerate", "rouge-score", "scikit-learn"],
        "flash": ["flash-attn"],
        "bench": ["pytorch-metric-learning", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib", "tqdm", "transformers>=4.45",
                 "safetensors", "scipy", "gguf", "accelerate", "rouge-score", "scikit-learn",
                 "pytorch-metric-learning"],
        # CLRegMixin for transformers.Trainer-based methods (clreg_fast.integrations.hf)
        "hf": ["transformers>=4.45", "accelerate"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

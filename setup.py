"""Install clreg_fast (pure Python for now; the CUDA extension build arrives with csrc/)."""
from setuptools import find_packages, setup

setup(
    name="clreg_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for the CLReg contrastive unlearning regularizer",
    packages=find_packages(include=["clreg_fast", "clreg_fast.*"]),
    python_requires=">=3.9",
    entry_points={"console_scripts": ["clreg-unlearn=clreg_fast.unlearn.cli:main"]},
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.2"],
        "unlearn": ["transformers>=4.45", "safetensors", "tqdm", "matplotlib", "scipy"],
        "flash": ["flash-attn"],
        "test": ["pytest", "pytest-benchmark", "numpy", "matplotlib", "tqdm", "transformers>=4.45",
                 "safetensors", "scipy"],
    },
)

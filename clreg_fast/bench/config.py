"""What one benchmark measures: a loss configuration, the providers that compute it, the sweep plan.

A *config* is one input shape and setting (Nf, Nr, D, P, dtype, labels, retain detached or not).
A *task* is one (config, provider) pair; a *plan* is the ordered list of tasks of a run. Plans are
ordered by priority: the sweep runs them in order within its time budget, so the configurations
that matter most (the headline target, the largest size) come first.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# Providers, in the order tables and legends list them.
#   reference      clreg_loss_reference, eager PyTorch with float32 math (the readable definition)
#   eager_native   the same eager math in the inputs' dtype (bf16 matmuls), as a hand-written
#                  low-precision PyTorch loss would do; only for bf16/fp16 inputs
#   compile        torch.compile of the reference math (float32), no input validation inside
#   compile_native torch.compile of the math in the inputs' dtype; only for bf16/fp16 inputs
#   supcon         pytorch-metric-learning's SupConLoss (float32) on the projected rows, retain
#                  rows with unique labels: the unfused peer a user would otherwise pick
#   torch/triton/cuda  fused_clreg_loss(backend=...)
PROVIDERS = ("reference", "eager_native", "compile", "compile_native", "supcon", "torch",
             "triton", "cuda")
MATERIALIZING = ("reference", "eager_native", "compile", "compile_native", "supcon")
FUSED = ("torch", "triton", "cuda")
NATIVE_ONLY_LOWP = ("eager_native", "compile_native")

DTYPES: Dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
DEFAULT_NUM_LABELS = 16


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One loss configuration. ``p=None`` means no projection (the loss works on the raw D)."""

    nf: int
    nr: int
    d: int
    p: Optional[int]
    dtype: str = "bf16"
    labels: bool = False          # False: labels=None (one concept); True: DEFAULT_NUM_LABELS concepts
    retain_detached: bool = False  # True: retain.detach(), the "minimal shift on retain" use
    temperature: float = 0.1

    def __post_init__(self):
        for name in ("nf", "d"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.nr, bool) or not isinstance(self.nr, int) or self.nr < 0:
            raise ValueError(f"nr must be an int >= 0, got {self.nr!r}")
        if self.nf < 2:
            raise ValueError(f"nf must be at least 2 (an anchor and a positive), got {self.nf}")
        if self.p is not None and (isinstance(self.p, bool) or not isinstance(self.p, int)
                                   or self.p < 1):
            raise ValueError(f"p must be a positive int or None (no projection), got {self.p!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.labels and self.nf < 2 * DEFAULT_NUM_LABELS:
            raise ValueError(f"labels=True needs nf >= {2 * DEFAULT_NUM_LABELS} so that every "
                             f"one of the {DEFAULT_NUM_LABELS} concepts has a positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n(self) -> int:
        """Rows of the similarity problem, Nf + Nr."""
        return self.nf + self.nr

    def group_key(self) -> Tuple:
        """Everything but the sizes Nf, Nr: the curves of a plot are drawn along N per group."""
        return (self.d, self.p, self.dtype, self.labels, self.retain_detached, self.temperature)

    def group_label(self) -> str:
        return group_label(self.group_key())

    def short(self) -> str:
        return f"N={self.nf}/{self.nr} " + self.group_label()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def group_label(key: Tuple) -> str:
    d, p, dtype, labels, retain_detached, temperature = key
    proj = f"P={p}" if p is not None else "no proj"
    lab = "labels" if labels else "no labels"
    ret = "retain detached" if retain_detached else "retain with grad"
    tau = "" if temperature == 0.1 else f", tau={temperature:g}"
    return f"D={d}, {proj}, {dtype}, {lab}, {ret}{tau}"


@dataclasses.dataclass(frozen=True)
class Task:
    """One measurement: a provider on a config."""

    config: BenchConfig
    provider: str


# ---------------------------------------------------------------------------------------------
# Parsing of the sweep options (comma lists on the command line)

def _split(text: str, what: str) -> List[str]:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a comma-separated string, got {type(text).__name__}")
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def parse_sizes(text: str, what: str = "sizes") -> List[int]:
    """``"1k,2048,256k"`` -> ``[1024, 2048, 262144]`` (k = 1024)."""
    sizes = []
    for item in _split(text, what):
        low = item.lower()
        mult = 1
        if low.endswith("k"):
            low, mult = low[:-1], 1024
        try:
            value = int(low) * mult
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not an integer (e.g. 4096 or 4k)") from None
        if value < 1:
            raise ValueError(f"{what}: {item!r} must be positive")
        sizes.append(value)
    return sizes


def parse_projections(text: str) -> List[Optional[int]]:
    """``"128,256,none"`` -> ``[128, 256, None]``."""
    out: List[Optional[int]] = []
    for item in _split(text, "projection sizes"):
        if item.lower() in ("none", "no", "0", "off"):
            out.append(None)
        else:
            out.extend(parse_sizes(item, "projection sizes"))
    return out


def parse_dtypes(text: str) -> List[str]:
    out = []
    for item in _split(text, "dtypes"):
        key = _DTYPE_ALIASES.get(item.lower())
        if key is None:
            raise ValueError(f"dtypes: unknown dtype {item!r}; use bf16, fp16 or fp32")
        out.append(key)
    return out


def parse_flags(text: str, what: str, true_words: Sequence[str], false_words: Sequence[str]
                ) -> List[bool]:
    out = []
    for item in _split(text, what):
        low = item.lower()
        if low in true_words:
            out.append(True)
        elif low in false_words:
            out.append(False)
        else:
            raise ValueError(f"{what}: {item!r} is not one of {list(true_words) + list(false_words)}")
    return out


def parse_labels(text: str) -> List[bool]:
    return parse_flags(text, "labels", ("on", "yes", "true", "1"), ("off", "no", "false", "0"))


def parse_retain(text: str) -> List[bool]:
    """``"grad,detached"`` -> ``[False, True]`` (values of ``retain_detached``)."""
    return parse_flags(text, "retain", ("detached", "detach", "frozen"), ("grad", "trainable"))


def parse_providers(text: str) -> List[str]:
    out = []
    for item in _split(text, "providers"):
        low = item.lower()
        if low not in PROVIDERS:
            raise ValueError(f"providers: unknown provider {item!r}; choose from {PROVIDERS}")
        if low not in out:
            out.append(low)
    return out


def grid(ns: Iterable[int], ds: Iterable[int], ps: Iterable[Optional[int]], dtypes: Iterable[str],
         labels: Iterable[bool], retain: Iterable[bool]) -> List[BenchConfig]:
    """Cartesian product, Nf = Nr = N; the N loop is innermost so each curve is contiguous."""
    configs = []
    for dtype in dtypes:
        for d in ds:
            for p in ps:
                for lab in labels:
                    for det in retain:
                        for n in ns:
                            configs.append(BenchConfig(n, n, d, p, dtype, lab, det))
    return configs


def expand(jobs: Sequence[Tuple[BenchConfig, Sequence[str]]]) -> List[Task]:
    """Tasks of a job list, in order, without duplicates; native-dtype variants only for bf16/fp16."""
    tasks, seen = [], set()
    for config, providers in jobs:
        for provider in providers:
            if provider in NATIVE_ONLY_LOWP and config.dtype == "fp32":
                continue  # identical to reference / compile for float32 inputs
            task = Task(config, provider)
            if task not in seen:
                seen.add(task)
                tasks.append(task)
    return tasks


# ---------------------------------------------------------------------------------------------
# Presets

TARGET = BenchConfig(8192, 8192, 4096, 256, "bf16")  # the headline configuration
N_SWEEP_GPU = [1024 << k for k in range(9)]           # 1k ... 256k per side
GPU_MAX_N = {"torch": 32768}  # chunk rows shrink as 1/N in the chunked backend: time grows ~N^3


def preset_jobs(name: str, providers: Optional[Sequence[str]] = None
                ) -> List[Tuple[BenchConfig, List[str]]]:
    """The job list of a preset, highest priority first; ``providers`` filters it."""
    if name == "gpu":
        jobs = _gpu_jobs()
    elif name == "cpu":
        jobs = _cpu_jobs()
    elif name == "tiny":  # for tests: seconds on a laptop CPU
        jobs = [(c, ["reference", "torch"]) for c in grid([64, 128], [32], [16, None], ["fp32"],
                                                           [False], [False])]
    else:
        raise ValueError(f"unknown preset {name!r}; choose gpu, cpu or tiny")
    if providers is not None:
        wanted = set(providers)
        jobs = [(c, [p for p in provs if p in wanted]) for c, provs in jobs]
    return [(c, provs) for c, provs in jobs if provs]


def _gpu_jobs():
    eager_and_fused = ["reference", "eager_native", "torch", "triton", "cuda"]
    fused = ["triton", "cuda"]
    big = dataclasses.replace(TARGET, nf=262144, nr=262144)
    jobs = [
        (TARGET, eager_and_fused),
        # The largest size: eager runs out of memory (recorded, cheap); the fused kernels must run.
        (big, ["reference", "triton", "cuda"]),
        # torch.compile after those two: its compilations cost tens of seconds each.
        (TARGET, ["compile", "compile_native"]),
        (TARGET, ["supcon"]),
    ]
    # N sweep of the headline group.
    for n in N_SWEEP_GPU:
        cfg = dataclasses.replace(TARGET, nf=n, nr=n)
        jobs.append((cfg, [p for p in eager_and_fused if n <= GPU_MAX_N.get(p, n)]))
    # One-factor variants around the target.
    variants = [
        dict(d=2048), dict(p=128), dict(p=None), dict(dtype="fp32"), dict(labels=True),
        dict(retain_detached=True),
    ]
    for change in variants:
        jobs.append((dataclasses.replace(TARGET, **change), eager_and_fused))
    # N sweeps of the variant groups, fused kernels first, eager until it runs out of memory.
    for change in variants:
        for n in N_SWEEP_GPU:
            cfg = dataclasses.replace(TARGET, nf=n, nr=n, **change)
            jobs.append((cfg, fused))
        for n in N_SWEEP_GPU:
            cfg = dataclasses.replace(TARGET, nf=n, nr=n, **change)
            jobs.append((cfg, [p for p in ["reference", "torch"] if n <= GPU_MAX_N.get(p, n)]))
    # torch.compile along N last: every new shape costs a compilation (tens of seconds).
    for n in N_SWEEP_GPU[:6]:
        jobs.append((dataclasses.replace(TARGET, nf=n, nr=n), ["compile", "compile_native"]))
    return jobs


def _cpu_jobs():
    """A few minutes on two busy cores: one compile, two N sweeps, three one-factor variants."""
    head = BenchConfig(2048, 2048, 1024, 128, "fp32")
    jobs = [(head, ["reference", "compile", "supcon", "torch"])]
    for n in [256, 512, 1024, 4096]:
        jobs.append((dataclasses.replace(head, nf=n, nr=n), ["reference", "torch"]))
    for n in [256, 512, 1024, 2048]:
        jobs.append((BenchConfig(n, n, 256, None, "fp32"), ["reference", "torch"]))
    small = dataclasses.replace(head, nf=1024, nr=1024)
    for change in [dict(labels=True), dict(retain_detached=True), dict(dtype="bf16")]:
        jobs.append((dataclasses.replace(small, **change), ["reference", "torch"]))
    return jobs


def custom_jobs(ns, ds, ps, dtypes, labels, retain, providers) -> List[Tuple[BenchConfig, List[str]]]:
    return [(c, list(providers)) for c in grid(ns, ds, ps, dtypes, labels, retain)]

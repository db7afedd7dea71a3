"""Compile the triton kernels for a GPU architecture without a GPU, and report what came out.

    python -m clreg_fast.backends.triton.compile_check --arch 90 80 --p 24 128 256 --dtype fp32 bf16
    python -m clreg_fast.backends.triton.compile_check --candidates --arch 90 80 --p 256 128
    python -m clreg_fast.backends.triton.compile_check --grid --arch 90 80 --p 256 --dtype bf16

Default mode: each kernel variant that ``TritonKernels`` launches by default for the given feature
widths and input dtypes. ``--candidates``: every configuration of the similarity kernels that the
autotuner may choose (``tuning.candidates``). ``--grid``: the wider grid the candidate lists were
taken from, to regenerate them. Each variant is compiled to a cubin (triton bundles ptxas) with
the 16-divisibility hints triton's launcher gives it at that P (``launch_alignment``;
``--unaligned``: none, as for misaligned views) and reported with the MMA instruction family it
uses (``wgmma``, ``mma.sync`` or ``none``, read from the PTX), registers and spill bytes
(``ptxas -v`` with triton's options) and shared memory. A
variant fails on a compile error, shared memory over the architecture's limit or, outside
``--grid``, any register spill. Reports are cached by triton's kernel hash (the compiled kernels
themselves sit in triton's cache), so a second run takes seconds. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from clreg_fast.backends.triton import kernels as K
from clreg_fast.backends.triton import ops, tuning

DTYPES = {"fp32": (K.ROUND_FP32, "*fp32"), "tf32": (K.ROUND_TF32, "*fp32"),
          "bf16": (K.ROUND_BF16, "*bf16"), "fp16": (K.ROUND_FP16, "*fp16")}
# Largest shared memory per block (opt-in): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SIMILARITY_FNS = {"lse_forward": K.lse_forward_kernel,
                  "lse_backward_rows": K.lse_backward_rows_kernel,
                  "lse_backward_cols": K.lse_backward_cols_kernel}
CACHE_ENV = "CLREG_COMPILE_CHECK_CACHE"


# Integer arguments that are multiples of 16 in every launch (column splits hold whole BLOCK_N
# tiles), those that are when P is (P itself and the row strides of P-wide rows), and those that
# are when D is (taken as a multiple of 16, as every common hidden size is).
_ALWAYS_ALIGNED = frozenset({"cols_per_split"})
_P_ALIGNED = frozenset({"P", "stride_a", "stride_c", "stride_d", "stride_out", "stride_y",
                        "stride_z", "stride_dz", "stride_dy"})
_D_ALIGNED = frozenset({"D", "stride_x", "stride_w"})


def launch_alignment(fn, p: int) -> frozenset:
    """The arguments triton's launcher marks 16-divisible at feature width p.

    At launch triton specializes each pointer and integer argument on whether it is a multiple of
    16 (``tt.divisibility``), and the code differs a lot (vector loads, fewer address
    registers), so a check has to compile the specialization that runs. Pointers: torch's
    allocations are 16-byte aligned, and so are the row slices the launchers get when a row is a
    multiple of 4 floats. Row counts depend on the batch and are left unspecialized.
    """
    names = set(_ALWAYS_ALIGNED | _D_ALIGNED)
    if p % 16 == 0:
        names |= _P_ALIGNED
    if p % 4 == 0:
        names |= {name for name in fn.arg_names if name.endswith("_ptr")}
    return frozenset(name for name in names if name in fn.arg_names)


class Variant(NamedTuple):
    fn: object
    types: dict
    consts: dict
    num_warps: int
    num_stages: int
    aligned: frozenset = frozenset()  # arguments compiled as multiples of 16

    @property
    def label(self) -> str:
        # kernels without ROUND take their input's dtype from the pointer type
        source = "" if "ROUND" in self.consts else f" in={self.types[self.fn.arg_names[0]]}"
        return (f"{self.fn.__name__}{source} "
                + " ".join(f"{k}={v}" for k, v in self.consts.items() if k != "INTERPRET")
                + f" warps={self.num_warps} stages={self.num_stages}" + self._alignment_tag())

    def _alignment_tag(self) -> str:
        """Empty for the usual launch (P a multiple of 16, aligned pointers)."""
        if not any(name.endswith("_ptr") for name in self.aligned):
            return " unaligned"
        if "P" in self.fn.arg_names and "P" not in self.aligned:
            return " P-unaligned"
        return ""


class Report(NamedTuple):
    mma: str
    regs: int
    spill_bytes: int
    shared: int


def _signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def _divisibility(fn, aligned):
    """``ASTSource`` attributes marking ``aligned`` arguments as multiples of 16."""
    indices = [i for i, name in enumerate(fn.arg_names) if name in aligned]
    try:  # triton 3.2 takes an AttrsDescriptor; later versions a dict of attribute lists
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        return {(i,): [["tt.divisibility", 16]] for i in indices}
    return AttrsDescriptor.from_dict({"cls": AttrsDescriptor.__name__,
                                      "arg_properties": {"tt.divisibility": indices}})


def mma_family(ptx: str) -> str:
    """The tensor-core instruction family a kernel's PTX uses."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def _ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store + load bytes) from ``ptxas -v`` run as triton runs it."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        raise RuntimeError("ptxas not found in the triton package")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        arch_name = "sm_90a" if arch == 90 else f"sm_{arch}"
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}", f.name,
               "-o", os.devnull]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # an older ptxas without --regAllocOptLevel
            cmd.remove("--regAllocOptLevel=2")
            proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    stores = re.search(r"(\d+) bytes spill stores", out)
    loads = re.search(r"(\d+) bytes spill loads", out)
    if regs is None or stores is None or loads is None:
        raise RuntimeError(f"unexpected ptxas -v output: {out[-500:]}")
    return int(regs.group(1)), int(stores.group(1)) + int(loads.group(1))


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "clreg_fast" / "compile_check"))


def compile_variant(variant: Variant, arch: int) -> Report:
    """Compile one variant for ``sm_<arch>`` and read its resource use (cached on disk)."""
    src = ASTSource(variant.fn, _signature(variant.fn, variant.types, variant.consts),
                    variant.consts, _divisibility(variant.fn, variant.aligned))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=variant.num_warps,
                                           num_stages=variant.num_stages))
    key = hashlib.sha256(f"{compiled.hash}-{arch}".encode()).hexdigest()[:32]
    path = _cache_dir() / f"{key}.json"
    try:
        return Report(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_usage(ptx, arch)
    report = Report(mma_family(ptx), regs, spills, int(compiled.metadata.shared))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report._asdict()))
    except OSError:
        pass
    return report


def _similarity_types() -> dict:
    ptrs = {name: "*fp32" for name in ("za_ptr", "zc_ptr", "lse_ptr", "w_ptr", "w_max_ptr",
                                       "dza_ptr", "dzc_ptr")}
    ptrs["scale"] = "fp32"
    return ptrs


def similarity_variant(kernel: str, dtype: str, block_p: int, k_tiles: int,
                       cfg: tuning.KernelConfig, fixed_shift: bool = True,
                       p: Optional[int] = None, aligned: bool = True) -> Variant:
    """One similarity kernel as launched at feature width ``p`` (default: the widest P of the
    tile, ``block_p * k_tiles``); ``aligned=False``: without triton's 16-divisibility hints."""
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_P=block_p, K_TILES=k_tiles,
                  ROUND=DTYPES[dtype][0], INTERPRET=False)
    if kernel == "lse_forward":
        consts = dict(FIXED_SHIFT=fixed_shift, **consts)
    fn = SIMILARITY_FNS[kernel]
    width = block_p * k_tiles if p is None else p
    return Variant(fn, _similarity_types(), consts, cfg.num_warps, cfg.num_stages,
                   launch_alignment(fn, width) if aligned else frozenset())


def _rowwise_variants(p: int, y_ptr: str, aligned: bool) -> Iterator[Variant]:
    f32 = "*fp32"
    rbm, rbp, rwarps = ops._rowwise_config(p)
    for fn, types in ((K.normalize_kernel, {"y_ptr": y_ptr, "z_ptr": f32, "norm_ptr": f32,
                                            "eps": "fp32"}),
                      (K.normalize_backward_kernel, {"dz_ptr": f32, "z_ptr": f32,
                                                     "norm_ptr": f32, "dy_ptr": f32,
                                                     "eps": "fp32"})):
        yield Variant(fn, types, dict(BLOCK_M=rbm, BLOCK_P=rbp), rwarps, 3,
                      launch_alignment(fn, p) if aligned else frozenset())


def variants(p: int, dtype: str, max_block_p: int = ops.MAX_BLOCK_P,
             aligned: bool = True) -> Iterator[Variant]:
    """Every kernel variant the launchers launch by default at feature width p."""
    round_kind, ptr = DTYPES[dtype]
    f32 = "*fp32"
    bm, bk, bp, p_tiles, warps = ops._project_config(p, round_kind, max_block_p)
    yield Variant(K.project_kernel, {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": f32,
                                     "norm_ptr": f32, "eps": "fp32"},
                  dict(HAS_BIAS=True, NORMALIZE=p_tiles == 1, BLOCK_M=bm, BLOCK_K=bk,
                       BLOCK_P=bp, ROUND=round_kind, INTERPRET=False), warps, 3,
                  launch_alignment(K.project_kernel, p) if aligned else frozenset())
    # The normalization reads the user's rows without a projection, and the projection's
    # float32 output when P is tiled.
    yield from _rowwise_variants(p, ptr, aligned)
    if p_tiles > 1 and ptr != f32:
        yield next(_rowwise_variants(p, f32, aligned))
    bp, k_tiles = ops._feature_block(p, max_block_p)
    for kernel in tuning.SIMILARITY_KERNELS:
        cfg = tuning.default_config(kernel, dtype, bp, k_tiles)
        for fixed in ((True, False) if kernel == "lse_forward" else (True,)):
            yield similarity_variant(kernel, dtype, bp, k_tiles, cfg, fixed, p, aligned)


def candidate_variants(p: int, dtype: str, max_block_p: int = ops.MAX_BLOCK_P,
                       aligned: bool = True) -> Iterator[Variant]:
    """Every candidate configuration of the similarity kernels at feature width p (the forward
    with both log-sum-exp forms: a tuned configuration serves both)."""
    bp, k_tiles = ops._feature_block(p, max_block_p)
    for kernel in tuning.SIMILARITY_KERNELS:
        for cfg in tuning.candidates(kernel, dtype, bp, k_tiles):
            for fixed in ((True, False) if kernel == "lse_forward" else (True,)):
                yield similarity_variant(kernel, dtype, bp, k_tiles, cfg, fixed, p, aligned)


def grid_configs(kernel: str, dtype: str, block_p: int,
                 k_tiles: int = 1) -> Iterator[tuning.KernelConfig]:
    """The grid the candidate lists and the tiled defaults were taken from.

    K_TILES == 1, tensor-core kinds: the tile side that is the M of the products (BLOCK_M;
    BLOCK_N in the column kernel) in 64/128, the other in 32/64/128; float32: both in 32/64;
    warps 4/8, stages 2/3. Left out as known to spill at BLOCK_P = 256: 128 x 128 tiles and 4
    warps in the backward. K_TILES > 1 (scores summed over feature tiles): both sides in 32/64,
    warps 4/8, stages 1/2/3.
    """
    if k_tiles > 1:
        for bm, bn, w, st in itertools.product((32, 64), (32, 64), (4, 8), (1, 2, 3)):
            yield tuning.KernelConfig(bm, bn, w, st)
        return
    if dtype == "fp32":
        sides = [(m, n) for m in (32, 64) for n in (32, 64)]
    else:
        sides = [(m, n) for m in (64, 128) for n in (32, 64, 128) if (m, n) != (128, 128)]
    warps = (8,) if kernel != "lse_forward" and block_p >= 256 else (4, 8)
    for m_side, other in sides:
        bm, bn = (other, m_side) if kernel == "lse_backward_cols" else (m_side, other)
        for w, st in itertools.product(warps, (2, 3)):
            yield tuning.KernelConfig(bm, bn, w, st)


def grid_variants(p: int, dtype: str, max_block_p: int = ops.MAX_BLOCK_P,
                  kernels=tuning.SIMILARITY_KERNELS, aligned: bool = True) -> Iterator[Variant]:
    bp, k_tiles = ops._feature_block(p, max_block_p)
    for kernel in kernels:
        for cfg in grid_configs(kernel, dtype, bp, k_tiles):
            yield similarity_variant(kernel, dtype, bp, k_tiles, cfg, True, p, aligned)


def check(variant_list: List[Variant], archs, allow_spills: bool = False,
          out=sys.stdout) -> Dict[tuple, Optional[Report]]:
    """Compile every variant for every arch, print one line each; returns label -> report."""
    results = {}
    for arch in archs:
        for variant in variant_list:
            label = f"sm_{arch} {variant.label}"
            try:
                report = compile_variant(variant, arch)
            except Exception as exc:  # report every failing variant, then fail
                results[(arch, variant.label)] = None
                print(f"FAIL {label}: {type(exc).__name__}: {exc}", file=out, flush=True)
                continue
            over = report.shared > SHARED_LIMIT.get(arch, 101376)
            spills = report.spill_bytes > 0 and not allow_spills
            results[(arch, variant.label)] = report
            status = "FAIL" if over or spills else "ok  "
            print(f"{status} {label} mma={report.mma} regs={report.regs} "
                  f"spill_bytes={report.spill_bytes} shared={report.shared}"
                  + (" (over the shared memory limit)" if over else "")
                  + (" (spills)" if spills else ""), file=out, flush=True)
    return results


def failed(results: Dict[tuple, Optional[Report]], allow_spills: bool = False) -> int:
    bad = 0
    for (arch, _), report in results.items():
        bad += (report is None or report.shared > SHARED_LIMIT.get(arch, 101376)
                or (report.spill_bytes > 0 and not allow_spills))
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--p", type=int, nargs="+", default=[24, 128, 256, 300])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--candidates", action="store_true",
                      help="every autotuning candidate of the similarity kernels")
    mode.add_argument("--grid", action="store_true",
                      help="the grid the candidate lists come from (spills reported, not failed)")
    parser.add_argument("--kernel", nargs="+", default=list(tuning.SIMILARITY_KERNELS),
                        choices=tuning.SIMILARITY_KERNELS, help="with --grid: these kernels")
    parser.add_argument("--unaligned", action="store_true",
                        help="compile without triton's 16-divisibility hints (a launch on "
                             "misaligned views); default: the specialization launched at each P")
    args = parser.parse_args(argv)
    if ops.INTERPRET:
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    variant_list = []
    for p in args.p:
        for dtype in args.dtype:
            aligned = not args.unaligned
            if args.grid:
                variant_list += list(grid_variants(p, dtype, kernels=args.kernel,
                                                   aligned=aligned))
            elif args.candidates:
                variant_list += list(candidate_variants(p, dtype, aligned=aligned))
            else:
                variant_list += list(variants(p, dtype, aligned=aligned))
    results = check(variant_list, args.arch, allow_spills=args.grid)
    bad = failed(results, allow_spills=args.grid)
    print(f"{len(results) - bad} ok, {bad} failed", flush=True)
    return 0 if args.grid or not bad else 1


if __name__ == "__main__":
    sys.exit(main())

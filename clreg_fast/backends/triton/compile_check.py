"""Compile the triton kernels for a GPU architecture without a GPU, with the launchers' configs.

    python -m clreg_fast.backends.triton.compile_check --arch 90 --p 24 128 256 --dtype fp32 bf16

Each kernel variant that ``TritonKernels`` would launch for the given feature widths and input
dtypes is compiled to a cubin (triton bundles ptxas), and its registers, spills and shared memory
are printed. Compilation errors that the interpreter cannot see (tl.dot shapes and dtypes,
layouts, shared memory over the limit) surface here. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from clreg_fast.backends.triton import kernels as K
from clreg_fast.backends.triton import ops

DTYPES = {"fp32": (K.ROUND_FP32, "*fp32"), "bf16": (K.ROUND_BF16, "*bf16"),
          "fp16": (K.ROUND_FP16, "*fp16")}
# Largest shared memory per block: A100 164 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _signature(fn, types, constexprs):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def _ptxas_report(ptx: str, arch: int) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        arch_name = "sm_90a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"-arch={arch_name}", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}"


def variants(p: int, dtype: str, max_block_p: int = ops.MAX_BLOCK_P):
    """(kernel, pointer types, constexprs, num_warps, num_stages) as the launchers choose them."""
    round_kind, ptr = DTYPES[dtype]
    f32 = "*fp32"
    bm, bk, bp, p_tiles, warps = ops._project_config(p, round_kind, max_block_p)
    yield (K.project_kernel, {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": f32,
                              "norm_ptr": f32, "eps": "fp32"},
           dict(HAS_BIAS=True, NORMALIZE=p_tiles == 1, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=bp,
                ROUND=round_kind, INTERPRET=False), warps, 3)
    rbm, rbp, rwarps = ops._rowwise_config(p)
    yield (K.normalize_kernel, {"y_ptr": ptr, "z_ptr": f32, "norm_ptr": f32, "eps": "fp32"},
           dict(BLOCK_M=rbm, BLOCK_P=rbp), rwarps, 3)
    yield (K.normalize_backward_kernel, {"dz_ptr": f32, "z_ptr": f32, "norm_ptr": f32,
                                         "dy_ptr": f32, "eps": "fp32"},
           dict(BLOCK_M=rbm, BLOCK_P=rbp), rwarps, 3)
    bp, k_tiles = ops._feature_block(p, max_block_p)
    bm, bn, warps, stages = ops._similarity_config(bp, k_tiles, round_kind)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, K_TILES=k_tiles, ROUND=round_kind,
                  INTERPRET=False)
    ptrs = {name: f32 for name in ("za_ptr", "zc_ptr", "lse_ptr", "w_ptr", "w_max_ptr", "dza_ptr",
                                   "dzc_ptr")}
    ptrs["scale"] = "fp32"
    for fixed in (True, False):
        yield K.lse_forward_kernel, ptrs, dict(FIXED_SHIFT=fixed, **common), warps, stages
    yield K.lse_backward_rows_kernel, ptrs, common, warps, stages
    yield K.lse_backward_cols_kernel, ptrs, common, warps, stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--p", type=int, nargs="+", default=[24, 128, 256, 300])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    if ops.INTERPRET:
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for p in args.p:
            for dtype in args.dtype:
                for fn, types, consts, warps, stages in variants(p, dtype):
                    label = (f"sm_{arch} P={p} {dtype} {fn.__name__} "
                             + " ".join(f"{k}={v}" for k, v in consts.items() if k != "INTERPRET")
                             + f" warps={warps} stages={stages}")
                    try:
                        src = ASTSource(fn, _signature(fn, types, consts), consts)
                        compiled = triton.compile(
                            src, target=target, options=dict(num_warps=warps, num_stages=stages))
                    except Exception as exc:  # report every failing variant, then fail
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    shared = compiled.metadata.shared
                    over = shared > SHARED_LIMIT.get(arch, 101376)
                    failures += over
                    print(f"{'FAIL' if over else 'ok  '} {label} shared={shared} "
                          f"{_ptxas_report(compiled.asm['ptx'], arch)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

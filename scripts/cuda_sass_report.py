"""Static evidence from the built extension's machine code (no GPU needed).

    python scripts/cuda_sass_report.py PATH/TO/_C.so [--cuobjdump PATH] [--out FILE]

Disassembles every kernel of the module (cuobjdump -sass), counts the instructions that show
what each design claims and fails (exit 1) when a claim does not hold:
  - sweep_tc_kernel (csrc/sweep_tc.cu), on every architecture: tensor-core MMAs (HMMA),
    asynchronous global->shared copies (LDGSTS), ldmatrix (LDSM), and no local-memory traffic
    (LDL/STL: spills or stack arrays);
  - sweep_wgmma_kernel (csrc/sweep_wgmma.cu), in its sm_90a code: one warpgroup MMA (HGMMA)
    per k block (D / 16, plus 4 for the backward's product), one WARPGROUP.ARRIVE per wgmma
    batch, the async-proxy fence (FENCE.VIEW.ASYNC.S), LDGSTS and no local-memory traffic;
    in other architectures' code (where it only traps) no HGMMA; with --expect-wgmma the
    module must hold the sm_90a kernels;
  - sweep_simt_kernel (csrc/sweep_simt.cu), on every architecture: LDGSTS, no HMMA (float32
    FMAs, no TF32), no local-memory traffic, and no global loads besides the row pass's 8 lse
    values (LDG): the workspace is never read back, the backward's accumulators stay in
    registers; one global store (STG) per accumulator, D / 2 of them;
  - the SIMT float32 kernels: no HMMA at all (float32 products, no TF32).
Prints a table per (architecture, kernel) and writes it to FILE when given.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

COUNTED = ("HMMA", "HGMMA", "LDGSTS", "LDSM", "LDS", "STS", "LDL", "STL", "MUFU.EX2", "LDG", "STG",
           "WARPGROUP.ARRIVE", "FENCE.VIEW.ASYNC.S")


def find_cuobjdump(explicit=None):
    candidates = [explicit] if explicit else []
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:  # triton ships one
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except Exception:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        if len(out) == len(names):
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return list(names)


MODES = {"0": "forward", "1": "rows", "2": "cols"}  # clreg::SweepMode


def short_name(name):
    name = name.replace("(anonymous namespace)::", "").replace("void ", "")
    name = re.sub(r"\(clreg::SweepMode\)(\d)", lambda m: MODES.get(m.group(1), m.group(1)), name)
    name = re.sub(r"\(.*", "", name)
    return name.replace("clreg::", "")


def parse_sass(text):
    """{(arch, mangled kernel): {opcode: count}} from cuobjdump -sass output."""
    counts = defaultdict(lambda: defaultdict(int))
    arch, kernel = None, None
    for line in text.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            kernel = m.group(1)
            counts[(arch, kernel)]  # kernels without any counted opcode are listed too
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)",
                      line)
        if m and kernel:
            op = m.group(1)
            for c in COUNTED:
                if op == c or op.startswith(c + "."):
                    counts[(arch, kernel)][c] += 1
                    break
    return counts


def check(counts, expect_wgmma=False):
    """Rows for the table and the list of failed claims."""
    names = demangle([k for _, k in counts])
    rows, failures = [], []
    for ((arch, _), ops), name in zip(counts.items(), names):
        short = short_name(name)
        rows.append((arch, short, ops))
        if "sweep_tc_kernel" in short:
            for op in ("HMMA", "LDGSTS", "LDSM"):
                if ops.get(op, 0) == 0:
                    failures.append(f"{arch} {short}: no {op}")
            if ops.get("LDL", 0) or ops.get("STL", 0):
                failures.append(f"{arch} {short}: local memory traffic (LDL/STL): spills")
        elif "sweep_wgmma_kernel" in short:
            if arch == "sm_90a":
                if ops.get("LDGSTS", 0) == 0:
                    failures.append(f"{arch} {short}: no LDGSTS")
                # One HGMMA per 16-wide k block (the k loops are unrolled): D / 16 for the
                # scores, 64 / 16 more for the backward's RS product.
                m = re.search(r"sweep_wgmma_kernel<[^,]+, (\d+), (\w+)>", short)
                if m:
                    want = int(m.group(1)) // 16 + (0 if m.group(2) == "forward" else 4)
                    if ops.get("HGMMA", 0) != want:
                        failures.append(f"{arch} {short}: {ops.get('HGMMA', 0)} HGMMA, not {want}")
                    # wgmma.fence (warpgroup_arrive) before each batch: scores, and product
                    batches = 1 if m.group(2) == "forward" else 2
                    if ops.get("WARPGROUP.ARRIVE", 0) != batches:
                        failures.append(f"{arch} {short}: {ops.get('WARPGROUP.ARRIVE', 0)} "
                                        f"WARPGROUP.ARRIVE, not {batches}")
                else:
                    failures.append(f"{arch} {short}: no D and mode in the kernel name")
                # fence.proxy.async between the cp.async writes and the wgmma reads
                if ops.get("FENCE.VIEW.ASYNC.S", 0) == 0:
                    failures.append(f"{arch} {short}: no FENCE.VIEW.ASYNC.S (proxy fence)")
                if ops.get("LDL", 0) or ops.get("STL", 0):
                    failures.append(f"{arch} {short}: local memory traffic (LDL/STL): spills")
            elif ops.get("HGMMA", 0):
                failures.append(f"{arch} {short}: HGMMA outside the sm_90a code")
        elif "sweep_simt_kernel" in short:
            if ops.get("LDGSTS", 0) == 0:
                failures.append(f"{arch} {short}: no LDGSTS")
            if ops.get("HMMA", 0):
                failures.append(f"{arch} {short}: HMMA in the float32 sweep (TF32?)")
            if ops.get("LDL", 0) or ops.get("STL", 0):
                failures.append(f"{arch} {short}: local memory traffic (LDL/STL): spills")
            m = re.search(r"<(\d+), (\w+)>", short)
            if m and m.group(2) != "forward":
                d, mode = int(m.group(1)), m.group(2)
                if ops.get("LDG", 0) > (8 if mode == "rows" else 0):
                    failures.append(f"{arch} {short}: {ops['LDG']} global loads (LDG): the "
                                    "workspace is read back")
                if ops.get("STG", 0) != d // 2:
                    failures.append(f"{arch} {short}: {ops.get('STG', 0)} global stores (STG), "
                                    f"not one per accumulator ({d // 2})")
        elif "<float>" in short and ops.get("HMMA", 0):
            failures.append(f"{arch} {short}: HMMA in a float32 kernel (TF32?)")
    for kernel in ("sweep_tc_kernel", "sweep_simt_kernel"):
        if not any(kernel in r[1] for r in rows):
            failures.append(f"no {kernel} in the module")
    if expect_wgmma and not any("sweep_wgmma_kernel" in r[1] and r[0] == "sm_90a" for r in rows):
        failures.append("no sm_90a sweep_wgmma_kernel in the module")
    return rows, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module")
    parser.add_argument("--cuobjdump")
    parser.add_argument("--out")
    parser.add_argument("--expect-wgmma", action="store_true",
                        help="fail when the module has no sm_90a sweep_wgmma_kernel")
    args = parser.parse_args(argv)
    tool = find_cuobjdump(args.cuobjdump)
    if tool is None:
        print("FAILED: no cuobjdump found (CUDA_HOME/bin, PATH or triton's copy)", file=sys.stderr)
        return 1
    text = subprocess.run([tool, "-sass", args.module], capture_output=True, text=True,
                          check=True).stdout
    rows, failures = check(parse_sass(text), args.expect_wgmma)
    cols = ("HMMA", "HGMMA", "LDGSTS", "LDSM", "LDS", "STS", "LDL", "STL", "LDG", "STG")
    lines = [f"{'arch':7} " + " ".join(f"{c:>6}" for c in cols) + "  kernel"]
    for arch, short, ops in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"{arch:7} " + " ".join(f"{ops.get(c, 0):>6}" for c in cols) + f"  {short}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# static instruction counts (cuobjdump -sass {os.path.basename(args.module)})\n")
            f.write(report)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Build checks of the CUDA extension clreg_fast._C (no GPU needed).
#
#   scripts/check_cuda_build.sh [[--python] PY] [--log FILE] [--incremental]
#       pip-installs this checkout with PY (default: $PYTHON, else python3; a CUDA build of
#       torch) into a throwaway --target directory with CLREG_FAST_CUDA_BUILD=1, keeps the full
#       build output, including ptxas' registers/spills/shared-memory report of every kernel,
#       in FILE (default build/cuda_build.log), prints a per-kernel summary, checks that sm_80
#       and sm_90 code was compiled and that no sweep kernel (sweep_tc_kernel,
#       sweep_simt_kernel) spills, imports clreg_fast._C from
#       outside the checkout, compares its split policy with the Python mirror and checks the
#       machine code (scripts/cuda_sass_report.py: HMMA, LDGSTS, LDSM, no local memory in the
#       sweep kernels; LDGSTS, no HMMA, no local memory in the float32 sweep;
#       build/cuda_sass_report.txt). With the CUTLASS headers (nvidia-cutlass,
#       or CLREG_FAST_CUTLASS_INCLUDE) setup.py also builds the wgmma sweep and compiles the 9.0
#       entry as sm_90a; its kernels must then exist for sm_90a, not spill, and show HGMMA and
#       LDGSTS without local memory.
#       The build starts from scratch (about 3 minutes on 2 cores); --incremental keeps ninja's
#       objects in build/ (seconds when csrc/ is unchanged, but then ptxas reports nothing new
#       and the summary of the last full build, build/cuda_resource_usage.txt, is shown).
#
#   scripts/check_cuda_build.sh --cpu-torch [[--python] PY]
#       makes a throwaway venv with torch==2.13.0 (CPU build), pip-installs a copy of this
#       checkout there (with and without build isolation) and checks that the install succeeds
#       without the extension and that the cuda backend is reported unavailable.
#
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2), CUDA_HOME
# (default: found from nvcc on PATH). Exits non-zero on any failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
LOG=""
MODE="cuda"
CLEAN=1
CPU_TORCH_VERSION="${CPU_TORCH_VERSION:-2.13.0}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --incremental) CLEAN=0; shift ;;
    --cpu-torch) MODE="cpu-torch"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "check_cuda_build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    *) PY="$1"; shift ;;  # `check_cuda_build.sh PY` as the Makefile calls it
  esac
done

# The checks run from other folders (the import from /tmp): make a relative PY absolute.
if [[ "$PY" == */* && "$PY" != /* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi

TMP="$(mktemp -d -t clreg_cuda_check.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

if [[ "$MODE" == "cuda" ]]; then
  LOG="${LOG:-$REPO/build/cuda_build.log}"
  mkdir -p "$(dirname "$LOG")"
  cd "$REPO"
  if [[ "$CLEAN" == 1 ]]; then rm -rf "$REPO"/build/temp.* "$REPO"/build/lib.*; fi
  export CLREG_FAST_CUDA_BUILD=1
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  export MAX_JOBS="${MAX_JOBS:-2}"
  echo "== building clreg_fast._C with $PY for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
       "(MAX_JOBS=$MAX_JOBS); log: $LOG"
  start=$(date +%s)
  if ! "$PY" -m pip install . --no-build-isolation --no-deps --target "$TMP/site" -v \
        >"$LOG" 2>&1; then
    grep -E "error|Error|FAILED" "$LOG" | grep -v "^ptxas info" | head -40 || true
    echo "FAILED: the CUDA extension did not build (full log: $LOG)" >&2
    exit 1
  fi
  echo "== built in $(( $(date +%s) - start )) s"

  # Per-kernel resource usage from ptxas -v; both architectures must be there.
  USAGE="$(dirname "$LOG")/cuda_resource_usage.txt"
  "$PY" - "$LOG" "$TORCH_CUDA_ARCH_LIST" "$USAGE" <<'EOF'
import os, re, subprocess, sys

log, arch_list, usage_file = open(sys.argv[1], errors="replace").read(), sys.argv[2], sys.argv[3]
rows, current = [], None
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
    if m:
        current = {"kernel": m.group(1), "arch": m.group(2)}
        continue
    if current is None:
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        current["spill"] = f"{m.group(1)}/{m.group(2)}"
    m = re.search(r"Used (\d+) registers", line)
    if m:
        # No "bytes smem" for kernels with dynamic shared memory only (the sweep kernels).
        smem = re.search(r"(\d+) bytes smem", line)
        current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
        rows.append(current)
        current = None
if not rows:
    if os.path.isfile(usage_file):  # an incremental build that compiled no kernel
        print(f"no kernel was recompiled; resource usage of the last full build ({usage_file}):")
        print(open(usage_file).read(), end="")
        sys.exit(0)
    sys.exit("FAILED: no ptxas resource report in the build log (was -Xptxas=-v dropped? "
             "an --incremental build reuses it only after one full build)")
try:
    names = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows),
                           capture_output=True, text=True).stdout.splitlines()
except OSError:
    names = [r["kernel"] for r in rows]
lines = [f"{'arch':7} {'regs':>4} {'spill st/ld (B)':>15} {'smem (B)':>8}  kernel"]
for r, name in zip(rows, names):
    name = re.sub(r"\(clreg::SweepMode\)(\d)",  # the sweep's template argument, by name
                  lambda m: {"0": "forward", "1": "rows", "2": "cols"}.get(m.group(1), "?"), name)
    short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "")).replace("void ", "")
    lines.append(f"{r['arch']:7} {r['regs']:>4} {r.get('spill', '?'):>15} {r['smem']:>8}  {short}")
spilling = [(r, n) for r, n in zip(rows, names) if r.get("spill", "0/0") != "0/0"]
if spilling:
    lines.append(f"note: {len(spilling)} kernel build(s) spill registers (see the table)")
# The sweep kernels keep their accumulators in registers by design: a spill is a failure.
SWEEPS = ("sweep_tc_kernel", "sweep_simt_kernel", "sweep_wgmma_kernel")
sweep_spills = [n for r, n in spilling if any(k in n for k in SWEEPS)]
report = "\n".join(lines) + "\n"
print(report, end="")
with open(usage_file, "w") as f:
    f.write(report)
# setup.py builds the 9.0 entry as 9.0a when it builds the wgmma sweep, and says so.
m = re.search(r"for TORCH_CUDA_ARCH_LIST=(\S+?),? MAX_JOBS", log)
arch_list = m.group(1) if m else arch_list
wgmma = "wgmma sweep (csrc/sweep_wgmma.cu) built for sm_90a" in log
wanted = {"sm_" + a.replace(".", "").replace("+PTX", "") for a in re.split(r"[;\s]+", arch_list) if a}
missing = wanted - {r["arch"] for r in rows}
if missing:
    sys.exit(f"FAILED: no kernels compiled for {sorted(missing)}")
for kernel in SWEEPS[:2]:  # the wgmma sweep only with CUTLASS, checked below
    if not any(kernel in n for n in names):
        sys.exit(f"FAILED: no {kernel} in the ptxas report")
if wgmma and not any("sweep_wgmma_kernel" in n and r["arch"] == "sm_90a"
                     for r, n in zip(rows, names)):
    sys.exit("FAILED: setup.py built the wgmma sweep but ptxas compiled no sm_90a sweep_wgmma_kernel")
if sweep_spills:
    sys.exit(f"FAILED: {len(sweep_spills)} sweep kernel build(s) spill registers")
# The glue picks the wgmma sweep when the probe kernel the GPU would load has static shared
# memory (csrc/sweep_wgmma.cu, kProbeMarkerInts = 90 ints): only its sm_90a build may have it.
probes = [r for r, n in zip(rows, names) if "sweep_wgmma_probe_kernel" in n]
if wgmma and not probes:
    sys.exit("FAILED: no sweep_wgmma_probe_kernel in the ptxas report")
wrong = [f"{r['arch']} ({r['smem']} B)" for r in probes if (r["arch"] == "sm_90a") != (r["smem"] >= 360)]
if wrong:
    sys.exit(f"FAILED: the wgmma probe kernel's shared memory marks the wrong builds: {wrong}")
print("== wgmma sweep: " + ("built for sm_90a (arch list " + arch_list + ")" if wgmma else
      "not built (no CUTLASS headers, or no 9.0 entry; see the build log)"))
EOF

  # Import from outside the checkout, so the installed copy is the one found.
  (cd /tmp && PYTHONPATH="$TMP/site" "$PY" - "$TMP/site" <<'EOF'
import os, sys
import clreg_fast._C as ext
assert os.path.realpath(ext.__file__).startswith(os.path.realpath(sys.argv[1])), ext.__file__
assert callable(ext.lse_forward) and callable(ext.lse_backward)
# The TORCH_LIBRARY operators (csrc/torch_ops.cpp) are registered, and their Python fake
# implementations give the right shapes on fake CUDA tensors (no GPU needed).
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from clreg_fast.backends.cuda import register_fake_impls
assert register_fake_impls(), "torch.ops.clreg_fast.cuda_* are not registered"
with FakeTensorMode():
    za, zc = torch.empty(5, 8, device="cuda"), torch.empty(9, 8, device="cuda")
    lse, w = torch.empty(5, device="cuda"), torch.empty(5, device="cuda")
    assert torch.ops.clreg_fast.cuda_lse_forward(za, zc, 0, 10.0, "float32").shape == (5,)
    dza, dzc = torch.ops.clreg_fast.cuda_lse_backward(za, zc, lse, w, 0, 10.0, 4, "float32", False)
    assert dza.shape == (0, 8) and dzc.shape == (4, 8)
print("== torch.ops.clreg_fast.cuda_lse_forward/backward: registered, fake impls ok")
print(f"== import clreg_fast._C: ok ({os.path.basename(ext.__file__)}, "
      f"CUDA runtime {ext.cuda_runtime_version})")
EOF
  ) || { echo "FAILED: clreg_fast._C does not import" >&2; exit 1; }

  # The compiled split policy (csrc/splits.h) against its Python mirror, which the float64
  # emulation tests (tests/test_cuda_emulation.py) rely on.
  (cd /tmp && PYTHONPATH="$TMP/site" "$PY" - <<'EOF'
import random
import clreg_fast._C as ext
from clreg_fast.backends.cuda import splits
rng = random.Random(0)
for _ in range(20000):
    args = [rng.randrange(0, 10 ** rng.randint(1, 7)) for _ in range(3)]
    args += [rng.randint(1, 200), rng.randint(1, 32)]
    assert tuple(ext.choose_splits(*args)) == splits.choose_splits(*args), args
print("== split policy: clreg_fast._C.choose_splits == clreg_fast.backends.cuda.splits (20000 cases)")
EOF
  ) || { echo "FAILED: the compiled split policy differs from its Python mirror" >&2; exit 1; }

  # What the machine code shows: HMMA + LDGSTS + LDSM and no local memory in the sweep
  # kernels, no HMMA in the float32 kernels (scripts/cuda_sass_report.py).
  SO="$(ls "$TMP"/site/clreg_fast/_C*.so | head -1)"
  SASS_ARGS=()
  if grep -q "wgmma sweep (csrc/sweep_wgmma.cu) built for sm_90a" "$LOG"; then
    SASS_ARGS=(--expect-wgmma)
  fi
  "$PY" "$REPO/scripts/cuda_sass_report.py" "$SO" --out "$(dirname "$LOG")/cuda_sass_report.txt" \
    "${SASS_ARGS[@]}" \
    || { echo "FAILED: the machine code does not show what the kernels claim" >&2; exit 1; }
  echo "CUDA build check passed"
  exit 0
fi

# --cpu-torch: a CPU-only torch must still give a working pure-Python install.
echo "== throwaway venv with torch==$CPU_TORCH_VERSION (CPU build)"
"$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
# setuptools and wheel at the lock's versions (the same build tools as every clone).
LOCKED_BUILD_TOOLS=$(grep -i -E "^(setuptools|wheel)==" "$REPO/requirements-lock.txt")
"$VPY" -m pip install -q "torch==$CPU_TORCH_VERSION" $LOCKED_BUILD_TOOLS >"$TMP/pip_torch.log" 2>&1 \
  || { cat "$TMP/pip_torch.log"; echo "FAILED: could not install torch==$CPU_TORCH_VERSION" >&2; exit 1; }
# A copy of the checkout's files (tracked and untracked, not ignored): no stale build/ or .so.
mkdir -p "$TMP/src"
(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$TMP/src")

check_install() {  # $1: label, $2...: extra pip arguments
  local label="$1"; shift
  echo "== pip install . ($label)"
  if ! (cd "$TMP/src" && "$VPY" -m pip install . -v "$@" >"$TMP/install_$label.log" 2>&1); then
    tail -30 "$TMP/install_$label.log"; echo "FAILED: pip install . ($label)" >&2; exit 1
  fi
  grep -q "without the CUDA extension" "$TMP/install_$label.log" \
    || { echo "FAILED: setup.py did not say that it skipped the extension ($label)" >&2; exit 1; }
  grep -m1 "without the CUDA extension" "$TMP/install_$label.log" | sed 's/^ */   /'
  (cd /tmp && "$VPY" -W ignore::UserWarning - "$CPU_TORCH_VERSION" <<'EOF'
import importlib, sys
import torch
import clreg_fast
from clreg_fast.backends.cuda import load_extension
assert torch.__version__.startswith(sys.argv[1]) and torch.version.cuda is None, torch.__version__
try:
    importlib.import_module("clreg_fast._C")
except ImportError:
    pass
else:
    sys.exit("FAILED: clreg_fast._C was installed with a CPU-only torch")
assert "cuda" not in clreg_fast.available_backends()
ext, reason = load_extension()
assert ext is None and reason, reason
loss = clreg_fast.fused_clreg_loss(torch.randn(6, 8), torch.randn(3, 8), backend="torch")
assert torch.isfinite(loss)
print(f"   torch {torch.__version__}: clreg_fast imports, backends {clreg_fast.available_backends()}; "
      f"cuda: {reason}")
EOF
  ) || { echo "FAILED: the pure-Python install does not work ($label)" >&2; exit 1; }
  "$VPY" -m pip uninstall -q -y clreg_fast
}

check_install "build-isolation"
check_install "no-build-isolation" --no-build-isolation --no-deps
echo "CPU-torch install check passed"

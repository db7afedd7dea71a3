#!/usr/bin/env bash
# On a GPU machine, in one call: build clreg_fast._C in place for the visible GPU, run the cuda
# backend's tests (tests/test_cuda_backend.py, GPU tests included) and time the backends.
#
#   scripts/gpu_check_cuda.sh [--python PY] [--no-bench] [extra pytest arguments]
#
# TORCH_CUDA_ARCH_LIST defaults to the visible GPU's architecture (one target builds fastest),
# MAX_JOBS to the number of cores. The build log with ptxas' register/spill report is kept in
# build/cuda_build_gpu.log. Exits non-zero when the build or a test fails.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BENCH=1
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --no-bench) BENCH=0; shift ;;
    *) PYTEST_ARGS+=("$1"); shift ;;
  esac
done
cd "$REPO"

arch="$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU visible"; print("%d.%d" % torch.cuda.get_device_capability())')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p build
echo "== building clreg_fast._C in place for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
if ! CLREG_FAST_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace >build/cuda_build_gpu.log 2>&1; then
  grep -E "error|FAILED" build/cuda_build_gpu.log | head -40 || true
  echo "FAILED: build (log: build/cuda_build_gpu.log)" >&2
  exit 1
fi
echo "== built in $(( $(date +%s) - start )) s; ptxas report:"
grep -E "Used [0-9]+ registers|spill stores" build/cuda_build_gpu.log | sed 's/^ *//' | sort | uniq -c || true

echo "== tests/test_cuda_backend.py"
"$PY" -m pytest tests/test_cuda_backend.py -q -rs "${PYTEST_ARGS[@]}"

if [[ "$BENCH" == 1 ]]; then
  echo "== forward + backward time (ms, median of 20) per backend"
  "$PY" - <<'EOF'
import torch
from clreg_fast import available_backends, fused_clreg_loss

def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]

backends = [b for b in available_backends() if b != "reference"]
print(f"{'dtype':9} {'Nf':>6} {'Nr':>6} {'D':>5} {'P':>5}  " + "  ".join(f"{b:>8}" for b in backends))
for dtype in (torch.bfloat16, torch.float32):
    for nf, nr, d, p in ((1024, 1024, 4096, 256), (4096, 4096, 2048, 128), (256, 16384, 1024, 512)):
        x_f = torch.randn(nf, d, device="cuda", dtype=dtype, requires_grad=True)
        x_r = torch.randn(nr, d, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(p, d, device="cuda", dtype=dtype) / d ** 0.5).requires_grad_()
        labels = torch.randint(0, 8, (nf,), device="cuda")
        row = []
        for b in backends:
            run = lambda: fused_clreg_loss(x_f, x_r, w, labels=labels, backend=b).backward()
            row.append(f"{timed(run):8.3f}")
        print(f"{str(dtype)[6:]:9} {nf:>6} {nr:>6} {d:>5} {p:>5}  " + "  ".join(row))
EOF
fi
echo "GPU check of the cuda backend passed"

# The two commands of the project: `make demo` (main job) and `make test`.
PYTHON ?= .venv/bin/python
PYTEST_ARGS ?=
OUT ?= out

.PHONY: venv demo demo-quick test test-unit check-cuda-build check-cpu-install bench-cpu gpu-suite

venv:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q -r requirements-dev.txt

demo:
	$(PYTHON) -m clreg_fast.demo

demo-quick:
	$(PYTHON) -m clreg_fast.demo --quick

# Unit, interpreter and torchrun/gloo tests; then the install checks: the CUDA extension compiles,
# links and imports (sm_80 + sm_90, no GPU needed), and a CPU-only torch installs without it.
test: test-unit check-cuda-build check-cpu-install

test-unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

check-cuda-build:
	bash scripts/check_cuda_build.sh $(PYTHON)

check-cpu-install:
	bash scripts/check_cuda_build.sh --cpu-torch $(PYTHON)

bench-cpu:
	$(PYTHON) -m clreg_fast.bench --preset cpu --threads 1 --out benchmarks/results/cpu-$$(date +%F)

# On a lent GPU machine: build, GPU tests, GPU sweep; everything lands in $(OUT).
gpu-suite:
	OUT=$(OUT) PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh

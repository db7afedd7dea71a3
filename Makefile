# The two commands of the project: `make demo` (main job) and `make test`.
PYTHON ?= .venv/bin/python
PYTEST_ARGS ?=
OUT ?= out

.PHONY: venv demo demo-quick test test-unit check-cuda-build check-cpu-install bench-cpu gpu-suite cutlass-wheel

# `make demo` and `make test` create .venv on first use (a fresh clone needs nothing else). With
# PYTHON set to another interpreter, that one is used as it is.
VENV_STAMP = .venv/.installed

venv: $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))

$(VENV_STAMP): requirements-dev.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q -r requirements-dev.txt
	# The CUTLASS/CuTe headers of the wgmma sweep; --no-deps: its Python dependencies are not used.
	.venv/bin/python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	touch $@

# MODEL=smollm2-135m runs the real-model configuration (the model is fetched once).
MODEL ?= tiny

demo: venv
	$(PYTHON) -m clreg_fast.demo --model $(MODEL)

demo-quick: venv
	$(PYTHON) -m clreg_fast.demo --model $(MODEL) --quick

# Unit, interpreter and torchrun/gloo tests; then the install checks: the CUDA extension compiles,
# links and imports (sm_80 + sm_90, no GPU needed), and a CPU-only torch installs without it.
test: venv test-unit check-cuda-build check-cpu-install

test-unit: venv
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

check-cuda-build:
	bash scripts/check_cuda_build.sh $(PYTHON)

check-cpu-install:
	bash scripts/check_cuda_build.sh --cpu-torch $(PYTHON)

bench-cpu:
	$(PYTHON) -m clreg_fast.bench --preset cpu --threads 1 --out benchmarks/results/cpu-$$(date +%F)

# The nvidia-cutlass wheel in build/wheels/, for a GPU machine without network (gpu_suite.sh
# installs it from there with --no-deps).
cutlass-wheel:
	$(PYTHON) -m pip download -q --no-deps nvidia-cutlass==4.2.0.0 -d build/wheels

# On a lent GPU machine: build, GPU tests, GPU sweep; everything lands in $(OUT).
gpu-suite:
	OUT=$(OUT) PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh

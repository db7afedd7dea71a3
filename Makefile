# The two commands of the project: `make demo` (main job) and `make test`.
PYTHON ?= .venv/bin/python
PYTEST_ARGS ?=
OUT ?= out

.PHONY: venv demo demo-quick test test-unit check-cuda-build check-cpu-install bench-cpu gpu-suite \
	cutlass-wheel test-latest lock test-oldest test-openunlearning-pins

# `make demo` and `make test` create .venv on first use (a fresh clone needs nothing else), with
# the exact versions of requirements-lock.txt. With PYTHON set to another interpreter, that one
# is used as it is.
VENV_STAMP = .venv/.installed
CUTLASS = nvidia-cutlass==4.2.0.0
# This machine's pip configuration names local index folders that may be absent; its warnings
# about them say nothing about the install.
PIP = -m pip install -q --disable-pip-version-check
QUIET_PIP = 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; test $${PIPESTATUS[0]} -eq 0
SHELL = /bin/bash

venv: $(if $(filter .venv/bin/python,$(PYTHON)),$(VENV_STAMP))

$(VENV_STAMP): requirements-dev.txt requirements-lock.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python $(PIP) -r requirements-dev.txt -c requirements-lock.txt $(QUIET_PIP)
	# The CUTLASS/CuTe headers of the wgmma sweep; --no-deps: its Python dependencies are not used.
	.venv/bin/python $(PIP) --no-deps $(CUTLASS) $(QUIET_PIP)
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

# Drift found on purpose: a fresh .venv-latest with the newest release of every dependency that
# requirements-dev.txt allows (torch is capped at 2.14.1 on this machine), then the CPU suite.
# Its versions land in .venv-latest/versions.txt; `make lock` makes them the lock.
test-latest:
	rm -rf .venv-latest && python3 -m venv .venv-latest
	.venv-latest/bin/python $(PIP) --upgrade -r requirements-dev.txt $(QUIET_PIP)
	.venv-latest/bin/python $(PIP) --no-deps $(CUTLASS) $(QUIET_PIP)
	.venv-latest/bin/python -m pip freeze --all --disable-pip-version-check 2>/dev/null \
	  | grep -v -i -E "^(pip|nvidia-cutlass)==" > .venv-latest/versions.txt
	@echo "== newest releases that differ from requirements-lock.txt:"
	@diff <(grep "==" requirements-lock.txt | sort -f) <(sort -f .venv-latest/versions.txt) | grep "^>" || echo "   none"
	$(MAKE) test-unit PYTHON=.venv-latest/bin/python

lock:
	test -f .venv-latest/versions.txt || { echo "run make test-latest first" >&2; exit 1; }
	{ sed -n '/^#/p' requirements-lock.txt; cat .venv-latest/versions.txt; } > requirements-lock.tmp
	mv requirements-lock.tmp requirements-lock.txt
	@echo "requirements-lock.txt moved to .venv-latest's versions: run make test, then commit"

# The oldest versions the package claims (setup.py: torch 2.6, triton 3.2, transformers 4.45),
# pinned with what they resolved to in requirements-oldest.txt; the core, compile, distributed
# and mixin tests.
OLDEST_TESTS = tests/test_reference.py tests/test_backends.py tests/test_validation.py \
	tests/test_grouping.py tests/test_compile.py tests/test_distributed.py tests/test_queue.py \
	tests/test_triton_kernels.py tests/test_hf_mixin.py tests/test_unlearn_features.py \
	tests/test_unlearn_methods.py \
	--deselect tests/test_triton_kernels.py::test_kernels_compile_for_hopper_and_ampere
# (That static check holds the launch defaults, chosen for the locked triton, to zero spills; under
# triton 3.2's compiler 8 of its 96 variants spill at P = 200: docs/backends.md.)

test-oldest: .venv-oldest/.installed
	$(MAKE) test-unit PYTHON=.venv-oldest/bin/python PYTEST_ARGS="$(OLDEST_TESTS) $(PYTEST_ARGS)"

.venv-oldest/.installed: requirements-oldest.txt
	test -x .venv-oldest/bin/python || python3 -m venv .venv-oldest
	.venv-oldest/bin/python $(PIP) -r requirements-oldest.txt $(QUIET_PIP)
	touch $@

# OpenUnlearning's pins (torch 2.4.1, transformers 4.45.1): the reference and torch backends, the
# mixin and the cross-rank loss. Its triton 3.0 is below what the triton backend needs, so the
# CI guard that triton runs is left out; torch.compile needs torch >= 2.6 (graph breaks on 2.4).
OU_PINS_TESTS = tests/test_reference.py tests/test_backends.py tests/test_validation.py \
	tests/test_grouping.py tests/test_distributed.py tests/test_queue.py tests/test_hf_mixin.py \
	tests/test_unlearn_features.py tests/test_unlearn_methods.py \
	--deselect tests/test_backends.py::test_triton_kernels_are_exercised_without_gpu

test-openunlearning-pins: .venv-openunlearning/.installed
	$(MAKE) test-unit PYTHON=.venv-openunlearning/bin/python PYTEST_ARGS="$(OU_PINS_TESTS) $(PYTEST_ARGS)"

.venv-openunlearning/.installed: requirements-openunlearning.txt
	test -x .venv-openunlearning/bin/python || python3 -m venv .venv-openunlearning
	.venv-openunlearning/bin/python $(PIP) -r requirements-openunlearning.txt $(QUIET_PIP)
	touch $@

bench-cpu:
	$(PYTHON) -m clreg_fast.bench --preset cpu --threads 1 --out benchmarks/results/cpu-$$(date +%F)

# The nvidia-cutlass wheel in build/wheels/, for a GPU machine without network (gpu_suite.sh
# installs it from there with --no-deps).
cutlass-wheel:
	$(PYTHON) -m pip download -q --no-deps nvidia-cutlass==4.2.0.0 -d build/wheels

# On a lent GPU machine: build, GPU tests, GPU sweep; everything lands in $(OUT).
gpu-suite:
	OUT=$(OUT) PYTHON=$(PYTHON) bash benchmarks/gpu_suite.sh

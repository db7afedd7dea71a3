# The two commands of the project: `make demo` (main job) and `make test`.
PYTHON ?= .venv/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo demo-quick test test-unit check-cuda-build bench-cpu gpu-suite

venv:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q -r requirements-dev.txt

demo:
	$(PYTHON) -m clreg_fast.demo

demo-quick:
	$(PYTHON) -m clreg_fast.demo --quick

# Unit, interpreter, distributed (gloo) tests, then the CUDA extension build check.
test: test-unit check-cuda-build

test-unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

check-cuda-build:
	bash scripts/check_cuda_build.sh $(PYTHON)

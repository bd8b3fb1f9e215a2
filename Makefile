# Two commands set up everything on a fresh machine:
#   make bench   - create .venv, install torch + deps, build the extension, run the benchmarks
#   make test    - same set-up, then the test suite
# Other targets: make venv | build | clean. Variables: PYTHON, VENV, TORCH_SPEC, MAX_JOBS,
# BENCH_ARGS (passed to benchmarks/inner_loop.py), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS ?= numpy pillow tqdm matplotlib pyyaml pytest expecttest hypothesis
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_ARGS ?=
PYTEST_ARGS ?= -q

.PHONY: venv build test bench clean

venv: $(VENV)/.deps-installed

$(VENV)/.deps-installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install $(TORCH_SPEC) $(DEPS)
	touch $@

# Editable install: the compiled _C lands next to the Python sources, so the tests and
# benchmarks of this checkout use it directly.
build: venv
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import mamlpp_ext; print('mamlpp_ext build:', mamlpp_ext.build_info())"

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/inner_loop.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info mamlpp_ext/_C*.so

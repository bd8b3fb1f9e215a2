# Two commands set up everything on a fresh machine:
#   make bench   - create .venv, install torch + deps, build the extension, run the benchmarks
#                  (the speed sections, short: update, batch norm, meta-step, sampling, host;
#                  fewer repeats, the two Omniglot meta-step cases, no 256x56x56 batch-norm
#                  shape; under 3 minutes on a 2-core CPU)
#   make test    - same set-up, then the test suite
# Other targets: make bench-all (every section, memory and task-conv included, at full size and
# repeats; 14 minutes on a 2-core CPU before those two sections joined, not timed since)
# | venv | build | lint | clean. Variables: PYTHON, VENV, TORCH_SPEC, MAX_JOBS, BENCH_ARGS
# (passed to benchmarks/inner_loop.py by `make bench`), BENCH_ALL_ARGS (by `make bench-all`),
# PYTEST_ARGS.
# The extension is compiled only when a file under csrc/, setup.py or pyproject.toml changed
# since the last build (or the compiled module is missing): `make bench` right after `make test`
# does not compile again.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS ?= numpy pillow tqdm matplotlib pyyaml pytest expecttest hypothesis ruff
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_ARGS ?= --quick --bn-no-large --what update,batchnorm,meta-step,sampling,host
BENCH_ALL_ARGS ?=
PYTEST_ARGS ?= -q

# What the compiled extension is built from; the stamp records the last successful build.
EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
EXT_STAMP := build/.mamlpp_ext-built

# No compiled module (after `make clean`, or deleted by hand): forget the stamp, so it is rebuilt.
ifeq ($(wildcard mamlpp_ext/_C*.so),)
$(shell rm -f $(EXT_STAMP))
endif

.PHONY: venv build test lint bench bench-all clean

venv: $(VENV)/.deps-installed

$(VENV)/.deps-installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install $(TORCH_SPEC) $(DEPS)
	touch $@

# Editable install: the compiled _C lands next to the Python sources, so the tests and
# benchmarks of this checkout use it directly.
build: $(EXT_STAMP)
	$(PY) -c "import mamlpp_ext; print('mamlpp_ext build:', mamlpp_ext.build_info())"

$(EXT_STAMP): $(VENV)/.deps-installed $(EXT_SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .
	mkdir -p $(dir $@)
	touch $@

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: venv
	$(PY) -m ruff check .

bench: build
	$(PY) benchmarks/inner_loop.py $(BENCH_ARGS)

bench-all: build
	$(PY) benchmarks/inner_loop.py $(BENCH_ALL_ARGS)

clean:
	rm -rf build *.egg-info mamlpp_ext/_C*.so

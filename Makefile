# fusedopt developer commands.
#
#   make test    create .venv if absent, install '.[test]' (editable, versions pinned by
#                constraints/ci.txt), run the test suite on CPU
#   make test-newest  the same in .venv-newest with constraints/newest.txt (jax 0.12, Python 3.12)
#   make demo    same set-up with '.[demo]', then run examples/digits_mlp.py on CPU: an MLP on
#                scikit-learn's digits with fusedopt.Adam and optax.adamw (curves checked to
#                agree, plot in digits_mlp_loss.png), then the train step timed against optax
#   make bench   same set-up with '.[bench]', then run `python -m bench`
#   make clean   remove the virtual environment and build/test caches
#   make gpu-vendor  copy jax-triton into .gpu_vendor for a GPU machine lacking it (gpu_run.sh)
#
# Every install passes pip the constraints file $(CONSTRAINTS) (default constraints/ci.txt): the
# exact versions CI tests, the lower bounds of pyproject.toml's ranges (docs/install.md).
# `make test CONSTRAINTS=other.txt` tests another set inside the ranges; CONSTRAINTS= none.
#
# Re-running is cheap: each extra's install is recorded in a stamp file inside .venv whose name
# carries a hash of pyproject.toml and the constraints file (and of the repo path, since the
# install is editable), so it is redone only when one of them changes or the checkout moves.
#
# pip's "WARNING: Location 'file:///opt/pypi...' is ignored" lines (a quirk of this machine's
# pip configuration, harmless) are filtered out; pip's exit status still counts (pipefail).
#
# Variables: PYTHON (interpreter that creates the venv, default python3), CONSTRAINTS, TESTS
# (what pytest runs, default tests), PYTEST_ARGS (extra pytest arguments), PYTEST_WORKERS
# (default auto: one per core; 0 runs in one process), TEST_XLA_FLAGS, DEMO_ARGS, BENCH_ARGS.
#
# TEST_XLA_FLAGS (prepended to XLA_FLAGS for the test run): LLVM's expensive passes off and
# LLVM at -O1 (--xla_backend_optimization_level=1) when XLA:CPU compiles the suite's ~ten
# thousand small programs (compiling is most of the suite's time on 2 cores): user CPU -13%
# (13:30 -> 11:54), the same tests pass. -O1 can reorder a float32 reduction: of 13 optimizers
# and tx.adamw, 5 steps each, only LARS's params and state differed from the default build's
# (norms summed in another order: within 3 ulp of each tensor's largest value), which every
# comparison of two paths already allows. `make test TEST_XLA_FLAGS=` runs with XLA's defaults.
# TEST_XLA_EMITTERS: XLA:CPU's IR fusion emitters instead of its MLIR ones, where the installed
# jaxlib still has them (jaxlib 0.10 does, 0.12 not: a probe decides, as XLA aborts on a flag it
# does not know): backend compiles take 40% less time (test_numerics + test_tx: 90 s -> 54 s of
# 970 compiles), the same tests pass. `make test TEST_XLA_EMITTERS=` keeps the MLIR emitters.
# The run also shares one jax compilation cache (a fresh temporary directory, removed after) among
# the pytest workers and their subprocesses, so an identical program compiles once.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/ci.txt
# --no-compile: Python compiles the modules a run imports on first import, instead of pip
# compiling every installed module up front (12 s of a fresh install's 45 s)
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check --no-compile \
  $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

TESTS ?= tests
PYTEST_ARGS ?=
# pytest-xdist workers (one per core); each test file stays on one worker (--dist loadfile), so a
# file's module-scoped set-up (the Triton interpreter run, the flax 0.5.3 venv) runs once
PYTEST_WORKERS ?= auto
TEST_XLA_FLAGS ?= --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=1
TEST_XLA_EMITTERS ?= --xla_cpu_use_fusion_emitters=false
DEMO_ARGS ?=
# an interpreter >= 3.12 for test-newest: pyenv's 3.12 where there is one, else python3.12
NEWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
  $(shell command -v python3.12 2>/dev/null))
BENCH_ARGS ?=

KEY := $(shell { cat pyproject.toml $(CONSTRAINTS); echo '$(CURDIR) $(CONSTRAINTS)'; } | sha1sum | cut -c1-12)
stamp = $(VENV)/.installed-$(1)-$(KEY)

.PHONY: test test-newest demo bench clean venv gpu-vendor
.NOTPARALLEL:

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

# $(VENV)/.installed-<extra>-<key>: the project installed editable with that extra.
$(VENV)/.installed-%-$(KEY): | $(PY)
	@echo "installing fusedopt[$*] into $(VENV) ..."
	rm -f $(VENV)/.installed-$*-*
	$(PIP_INSTALL) -e '.[$*]' 2>&1 | { grep -v "^WARNING: Location 'file:///opt/pypi" || true; }
	touch $@

test: $(call stamp,test)
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && flags="$(TEST_XLA_FLAGS)" && \
	  if [ -n "$(TEST_XLA_EMITTERS)" ] && XLA_FLAGS="$(TEST_XLA_EMITTERS)" JAX_PLATFORMS=cpu \
	      $(PY) -c 'import jax; jax.devices()' >/dev/null 2>&1; then \
	    flags="$$flags $(TEST_XLA_EMITTERS)"; fi && \
	  JAX_PLATFORMS=cpu XLA_FLAGS="$$flags $${XLA_FLAGS:-}" \
	  JAX_COMPILATION_CACHE_DIR="$$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 \
	  $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(TESTS) $(PYTEST_ARGS)

# The other end of the supported ranges: the newest jax the registries offer (constraints/newest.txt)
# in its own venv; jax 0.11 and later need Python 3.12 (NEWEST_PYTHON). Not part of CI (.ci/run):
# a second, by-hand run of the whole suite, recorded in bench/results/ (docs/install.md).
test-newest:
	$(MAKE) test VENV=.venv-newest PYTHON="$(NEWEST_PYTHON)" CONSTRAINTS=constraints/newest.txt

demo: $(call stamp,demo)
	JAX_PLATFORMS=cpu $(PY) examples/digits_mlp.py $(DEMO_ARGS)

bench: $(call stamp,bench)
	$(PY) -m bench $(BENCH_ARGS)

# .gpu_vendor: jax-triton (pure Python) from the test environment, for a lent GPU machine whose
# image has jax and triton but not jax-triton (bench/gpu_run.sh puts it on the path there).
gpu-vendor: $(call stamp,test)
	rm -rf .gpu_vendor && mkdir -p .gpu_vendor
	cp -r "$$($(PY) -c 'import os, importlib.util as u; print(os.path.dirname(u.find_spec("jax_triton").origin))')" .gpu_vendor/

clean:
	rm -rf $(VENV) .venv-newest .venv-flax053 build dist *.egg-info .pytest_cache .hypothesis .gpu_vendor
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Tessera: the two commands a new user needs are `make demo` and `make test`.
# Each sets itself up on a fresh Debian machine (root): Debian packages, .venv, the pinned CPU torch wheel, the package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= runs/demo
APT_PACKAGES := openmpi-bin libopenmpi-dev nginx slurmctld slurmd slurm-client munge
PYTEST_ARGS ?=

.PHONY: setup demo demo-quick demo-distributed test bench clean

setup: $(VENV)/.tessera-installed

# Debian packages: MPI for mpi4py, nginx for the crawl benchmark, SLURM + munge for the cluster tests (their fixture starts the daemons).
$(VENV)/.apt-done:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  else echo "note: not root, assuming $(APT_PACKAGES) are installed"; fi; fi
	@mkdir -p $(VENV) && touch $@

$(VENV)/.tessera-installed: $(VENV)/.apt-done setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU wheel first: an open range would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# youtokentome's setup imports Cython at build time, so it cannot build under pip's isolation.
	$(PIP) install -q "Cython<3" setuptools wheel
	$(PIP) install -q --no-build-isolation youtokentome
	# The distribution was called "tessera" before (a name taken on PyPI): drop such an install, whose bare top-level names would shadow nothing but clutter.
	$(PIP) uninstall -q -y tessera 2>/dev/null || true
	$(PIP) install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/tessera demo --output $(DEMO_OUT)

demo-quick: setup
	$(VENV)/bin/tessera demo --quick --output $(DEMO_OUT)-quick

# The demo, then its transformer on 4 local CPU processes in the paper's layout (2 groups of 2: FSDP2 within, PowerSGD
# across, per-resblock scales; fp16 where the CPU has fp16 matrix products, else fp32 with the scales on) beside 1 process.
demo-distributed: setup
	$(VENV)/bin/tessera demo --ranks 4 --output $(DEMO_OUT)-distributed

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf runs build *.egg-info

# Set-up, demo and tests. Every target creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hpcdl-installed
# The CPU build of torch; a plain "torch" requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TEST_RANKS ?= 4

.PHONY: all install demo test test-serial test-mpi bench clean

all: demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[mpich,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hpcdl train jobs/demo.toml -n 2

# Serial tests first (they start their own MPI jobs where needed), then the
# tests that run inside one MPI job of $(TEST_RANKS) ranks.
test: test-serial test-mpi

test-serial: $(STAMP)
	$(BIN)/python -m pytest -q -m "not mpi" tests

test-mpi: $(STAMP)
	$(BIN)/mpiexec -n $(TEST_RANKS) $(BIN)/python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs bench/results .pytest_cache

# Horovod 0.28.1, the optional all-reduce backend (--allreduce horovod) and benchmark
# peer. PyPI has only its source release, which needs two changes to build here:
# torch 2.13's headers need C++17 while the release's CMakeLists.txt sets the C++
# standard to 14, so tools/build_horovod.sh raises it to 17 in the unpacked sources;
# and Horovod must link the same MPI as mpi4py (the mpich wheel in .venv), because two
# MPI libraries in one process cannot share MPI_COMM_WORLD. The build takes several
# minutes, so the wheel is cached in HOROVOD_WHEEL_CACHE, outside the repository, and
# later runs install it from there.
HOROVOD_WHEEL_CACHE ?= $(HOME)/.cache/hpcdl/wheels

.PHONY: horovod
horovod: $(STAMP)
	VENV=$(VENV) HOROVOD_WHEEL_CACHE=$(HOROVOD_WHEEL_CACHE) tools/build_horovod.sh

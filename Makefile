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
	$(BIN)/hpcdl train -n 2 --dataset digits --model mlp --epochs 8 --run-dir runs/demo

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

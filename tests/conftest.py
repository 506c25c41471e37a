"""Shared fixtures and helpers for serial tests and tests inside one MPI job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
# Initialize MPI in the test process up front: CLI tests that run the launcher
# in-process set mpi4py.rc.initialize = False, which must not leave later
# in-process tests with an uninitialized MPI.
from mpi4py import MPI  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HPCDL = str(BIN / "hpcdl")
MPIEXEC = str(BIN / "mpiexec")


def run_cli(args: list[str], *, timeout: float = 240, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test environment's hpcdl on PATH; capture its output."""
    full_env = dict(os.environ)
    full_env.setdefault("HPCDL_LOG_LEVEL", "WARNING")
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    for name in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or ROOT)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture
def world():
    """The world Communicator of the MPI job running the tests."""
    from hpcdl.comm import Communicator

    return Communicator()


@pytest.fixture
def subcomms(world):
    """Communicators over the first 2, 3 and 4 ranks (None on ranks outside one)."""
    from mpi4py import MPI

    from hpcdl.comm import Communicator

    out = {}
    for size in (2, 3, 4):
        if size > world.size:
            continue
        color = 0 if world.rank < size else MPI.UNDEFINED
        sub = world.comm.Split(color, world.rank)
        out[size] = Communicator(sub) if sub != MPI.COMM_NULL else None
    return out

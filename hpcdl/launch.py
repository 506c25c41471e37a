"""Start ``mpiexec`` for ``-n N``, or detect that this process is already an MPI rank."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from hpcdl.errors import ConfigError

log = logging.getLogger(__name__)

# Variables that MPI process managers set in every rank they start: MPICH's
# Hydra (PMI_*), PMIx launchers such as Open MPI's prterun and Slurm's
# srun --mpi=pmix (PMIX_RANK), Open MPI (OMPI_COMM_WORLD_*) and srun --mpi=pmi2.
_RANK_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                   "OMPI_COMM_WORLD_RANK", "MPI_LOCALNRANKS")


def in_mpi_job() -> bool:
    """Return True when this process was started by an MPI launcher."""
    return any(name in os.environ for name in _RANK_VARIABLES)


def find_mpiexec() -> str:
    """Return the launcher of the MPI that mpi4py uses.

    Looks at ``$HPCDL_MPIEXEC``, then next to the Python interpreter (where the
    ``mpich`` wheel puts it in a virtual environment), then on ``PATH``.

    Raises:
        ConfigError: no launcher found.
    """
    override = os.environ.get("HPCDL_MPIEXEC")
    if override:
        if shutil.which(override) is None:
            raise ConfigError(f"HPCDL_MPIEXEC={override!r} is not an executable. Point it at your mpiexec.")
        return override
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise ConfigError("No MPI launcher (mpiexec) found. Install one with 'pip install mpich' "
                          "or load your site's MPI module, or set HPCDL_MPIEXEC to its path.")
    return found


def is_hydra(mpiexec: str) -> bool:
    """Return True when ``mpiexec`` is MPICH's Hydra process manager."""
    try:
        result = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "HYDRA" in result.stdout


def launch(ranks: int, args: list[str], *, keep_going: bool = False) -> int:
    """Run ``python -m hpcdl ARGS`` on ``ranks`` local MPI ranks and return the exit status.

    Ctrl-C is passed on to ``mpiexec``, which stops every rank.

    Args:
        keep_going: let the other ranks run on when one exits on its own (Hydra's
            ``-disable-auto-cleanup``). ``MPI_Abort`` still ends every rank.
    """
    mpiexec = find_mpiexec()
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "hpcdl", *args]
    if keep_going:
        if is_hydra(mpiexec):
            command[1:1] = ["-disable-auto-cleanup"]
        else:
            log.warning("%s is not MPICH's Hydra: a worker that dies may end the whole job", mpiexec)
    env = dict(os.environ)
    if sys.stderr.isatty():
        # Ranks see pipes, not the user's terminal; tell rank 0 a terminal is there.
        env["HPCDL_TTY"] = "1"
    log.debug("starting: %s", " ".join(command))
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

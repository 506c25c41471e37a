"""The environment report printed by ``hpcdl info``."""

from __future__ import annotations

import importlib.util
import platform

from hpcdl import __version__


def environment_report() -> dict[str, str]:
    """Return the MPI library, thread level, torch build and available backends."""
    import mpi4py
    import torch
    from mpi4py import MPI

    from hpcdl.launch import find_mpiexec, in_mpi_job

    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    try:
        mpiexec = find_mpiexec()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        mpiexec = f"not found ({exc})"
    backends = ["ring", "mpi", "hierarchical"]
    if importlib.util.find_spec("horovod") is not None:
        backends.append("horovod")
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        backends.append("nccl")
    return {
        "hpcdl": __version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()})",
        "mpi4py": mpi4py.__version__,
        "mpi library": MPI.Get_library_version().splitlines()[0].strip(),
        "mpi standard": "%d.%d" % MPI.Get_version(),
        "thread level": levels.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "mpiexec": mpiexec,
        "in mpi job": f"{in_mpi_job()} (rank {MPI.COMM_WORLD.Get_rank()} of {MPI.COMM_WORLD.Get_size()})",
        "backends": ", ".join(backends),
    }

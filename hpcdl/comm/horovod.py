"""All-reduce through Horovod's ops, behind ``--allreduce horovod``.

Horovod (built by ``make horovod`` against the same MPICH as mpi4py) runs its
own background thread, which fuses tensors and can write a timeline
(``HOROVOD_TIMELINE=FILE``). It spans ``MPI_COMM_WORLD``, so this backend works
only with a communicator over all ranks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from hpcdl.comm.ring import chunk_bounds

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_hvd: Any = None

# Horovod 0.28.1's MPI ops take these dtypes; others are reduced in float32.
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16)


def _horovod(size: int) -> Any:
    """Import and initialise ``horovod.torch`` once per process; check that it spans ``size`` ranks."""
    global _hvd
    with _init_lock:
        if _hvd is None:
            import horovod
            import horovod.torch as hvd

            hvd.init()
            log.info("horovod %s initialised: rank %d of %d", horovod.__version__, hvd.rank(), hvd.size())
            _hvd = hvd
    if _hvd.size() != size:
        raise RuntimeError(f"--allreduce horovod needs a communicator over all {_hvd.size()} ranks of "
                           f"MPI_COMM_WORLD, but this one has {size}. Use ring, mpi or hierarchical here.")
    return _hvd


def ring_model_bytes(numel: int, element_size: int, rank: int, size: int) -> int:
    """Return the bytes ``rank`` sends in a ring all-reduce of ``numel`` elements over ``size`` ranks.

    The same count as ``ring_allreduce`` returns: N-1 reduce-scatter and N-1
    all-gather steps, each sending one chunk.
    """
    if size == 1 or numel == 0:
        return 0
    lengths = [stop - start for start, stop in chunk_bounds(numel, size)]
    scatter = sum(lengths[(rank - step) % size] for step in range(size - 1))
    gather = sum(lengths[(rank - step + 1) % size] for step in range(size - 1))
    return (scatter + gather) * element_size


def horovod_allreduce(tensor: torch.Tensor, size: int) -> int:
    """Sum ``tensor`` in place across all ranks with ``horovod.torch.allreduce_``.

    Every rank must call this in the same order: Horovod names an unnamed
    operation by a per-process counter and matches operations across ranks by name.

    Args:
        tensor: a contiguous CPU tensor of the same shape and dtype on every rank.
        size: ranks of the calling communicator; must equal Horovod's size.

    Returns:
        Bytes this rank sent by a model, not a measurement: Horovod does not report
        its traffic, so this is what hpcdl's ring would send for the same tensor.
        MPICH's MPI_Allreduce, which Horovod calls, sends about as much for large
        tensors.
    """
    hvd = _horovod(size)
    if size == 1 or tensor.numel() == 0:
        return 0
    if tensor.dtype in _NATIVE_DTYPES:
        hvd.allreduce_(tensor, op=hvd.Sum)
    else:
        widened = tensor.float()
        hvd.allreduce_(widened, op=hvd.Sum)
        tensor.copy_(widened)
    return ring_model_bytes(tensor.numel(), tensor.element_size(), hvd.rank(), size)

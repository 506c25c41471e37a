"""Bandwidth-optimal ring all-reduce over point-to-point messages."""

from __future__ import annotations

import torch
from mpi4py import MPI

from hpcdl.comm.buffers import as_buffer

RING_TAG = 7101


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``parts`` contiguous (start, stop) ranges.

    The first ``numel % parts`` chunks get one extra element, so any length works,
    including lengths smaller than ``parts`` (trailing chunks are then empty).
    """
    base, extra = divmod(numel, parts)
    bounds = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def ring_allreduce(comm: MPI.Comm, tensor: torch.Tensor) -> int:
    """Sum ``tensor`` in place across ``comm`` with a ring reduce-scatter and all-gather.

    Each rank sends 2(N-1)/N of the buffer. In N-1 steps of reduce-scatter, a rank
    adds the chunk it receives from its left neighbour into its own copy. In N-1
    steps of all-gather, the fully reduced chunks then travel round the ring.
    Every rank ends with the same bytes, because each chunk is copied from the one
    rank that reduced it.

    Args:
        comm: an mpi4py communicator; every rank of it must call this.
        tensor: a contiguous CPU tensor of the same shape and dtype on every rank.

    Returns:
        The number of bytes this rank sent.
    """
    size = comm.Get_size()
    if size == 1 or tensor.numel() == 0:
        return 0

    rank = comm.Get_rank()
    flat = tensor.view(-1)
    bounds = chunk_bounds(flat.numel(), size)
    right = (rank + 1) % size
    left = (rank - 1) % size
    largest = max(stop - start for start, stop in bounds)
    scratch = torch.empty(largest, dtype=flat.dtype)
    sent = 0

    # Reduce-scatter: after N-1 steps this rank has the full sum of chunk rank+1.
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step) % size]
        recv_start, recv_stop = bounds[(rank - step - 1) % size]
        incoming = scratch[: recv_stop - recv_start]
        comm.Sendrecv(
            as_buffer(flat[send_start:send_stop]), dest=right, sendtag=RING_TAG,
            recvbuf=as_buffer(incoming), source=left, recvtag=RING_TAG,
        )
        flat[recv_start:recv_stop].add_(incoming)
        sent += (send_stop - send_start) * flat.element_size()

    # All-gather: pass each reduced chunk on until every rank has all of them.
    for step in range(size - 1):
        send_start, send_stop = bounds[(rank - step + 1) % size]
        recv_start, recv_stop = bounds[(rank - step) % size]
        comm.Sendrecv(
            as_buffer(flat[send_start:send_stop]), dest=right, sendtag=RING_TAG,
            recvbuf=as_buffer(flat[recv_start:recv_stop]), source=left, recvtag=RING_TAG,
        )
        sent += (send_stop - send_start) * flat.element_size()

    return sent

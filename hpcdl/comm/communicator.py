"""A communicator for torch tensors on top of an mpi4py communicator."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from mpi4py import MPI

from hpcdl.comm.buffers import as_buffer, sum_op
from hpcdl.comm.ring import ring_allreduce

ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "horovod")

# Below this size the vendor MPI_Allreduce's latency-optimal algorithms beat a
# ring, whose 2(N-1) steps each pay one message latency.
AUTO_RING_MIN_BYTES = 64 * 1024

# MPICH switches from recursive doubling to reduce-scatter plus all-gather at
# this size (MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE, 2048 bytes by default).
_VENDOR_SHORT_MSG_BYTES = 2048


class ByteCounter:
    """A thread-safe running total of bytes sent, shared by duplicated communicators."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._total += int(nbytes)

    @property
    def total(self) -> int:
        with self._lock:
            return self._total


class Communicator:
    """Collectives and point-to-point messages for torch tensors over MPI.

    Tensors travel through buffer methods (``Sendrecv``, ``Allreduce``, ``Bcast``),
    never through pickle. Every method counts the bytes this rank sends in
    ``bytes_sent``. Ring and point-to-point counts are exact. Vendor collectives are
    counted by the volume of the algorithm MPICH uses for that size: recursive
    doubling below 2 KiB, otherwise reduce-scatter plus all-gather, and a
    binomial tree for broadcast. That is an estimate for other MPI libraries.

    Args:
        comm: the mpi4py communicator; ``MPI.COMM_WORLD`` when omitted.
        ranks_per_node: group consecutive ranks into nodes of this size instead
            of asking MPI which ranks share memory. A testing aid to emulate
            several nodes on one machine; 0 means ask MPI.
        counter: share a byte counter with another communicator.

    Example:
        >>> comm = Communicator()
        >>> grad = torch.ones(1000)
        >>> comm.allreduce(grad, algorithm="ring")  # grad now contains the sum
    """

    def __init__(self, comm: MPI.Comm | None = None, *, ranks_per_node: int = 0,
                 counter: ByteCounter | None = None) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.ranks_per_node = ranks_per_node
        self.counter = counter if counter is not None else ByteCounter()
        self._node: Communicator | None = None
        self._leaders: Communicator | None = None

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent through this communicator and its duplicates."""
        return self.counter.total

    def dup(self) -> Communicator:
        """Return a communicator with its own MPI context that shares the byte counter."""
        return Communicator(self.comm.Dup(), ranks_per_node=self.ranks_per_node,
                            counter=self.counter)

    def split(self, color: int, key: int | None = None) -> Communicator:
        """Split into sub-communicators by ``color``, sharing the byte counter."""
        sub = self.comm.Split(color, self.rank if key is None else key)
        return Communicator(sub, ranks_per_node=self.ranks_per_node, counter=self.counter)

    # Collectives

    def allreduce(self, tensor: torch.Tensor, *, algorithm: str = "auto",
                  average: bool = False) -> torch.Tensor:
        """Sum (or average) ``tensor`` in place across all ranks and return it.

        Args:
            tensor: contiguous CPU tensor, same shape and dtype on every rank;
                float32, float64, float16 and bfloat16 are supported.
            algorithm: ``ring``, ``mpi`` (vendor MPI_Allreduce), ``hierarchical``
                (inside each node, then a ring across nodes) or ``auto``, which
                takes the ring for buffers of 64 KiB and more.
            average: divide by the number of ranks after summing.
        """
        if algorithm == "auto":
            algorithm = "ring" if tensor.numel() * tensor.element_size() >= AUTO_RING_MIN_BYTES else "mpi"
        if algorithm == "ring":
            self.counter.add(ring_allreduce(self.comm, tensor))
        elif algorithm == "mpi":
            self._vendor_allreduce(tensor)
        elif algorithm == "hierarchical":
            self._hierarchical_allreduce(tensor)
        elif algorithm == "horovod":
            from hpcdl.comm.horovod import horovod_allreduce

            self.counter.add(horovod_allreduce(tensor, self.size))
        else:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if average:
            tensor.div_(self.size)
        return tensor

    def _vendor_allreduce(self, tensor: torch.Tensor) -> None:
        if self.size == 1:
            return
        self.comm.Allreduce(MPI.IN_PLACE, as_buffer(tensor), op=sum_op(tensor.dtype))
        self.counter.add(vendor_allreduce_bytes(tensor.numel() * tensor.element_size(), self.size))

    def _hierarchical_allreduce(self, tensor: torch.Tensor) -> None:
        node = self.node_comm()
        node.reduce(tensor, root=0)
        leaders = self.leader_comm()
        if leaders is not None:
            leaders.allreduce(tensor, algorithm="ring")
        node.broadcast(tensor, root=0)

    def reduce(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Sum ``tensor`` onto ``root`` in place. Other ranks' tensors are left as they were."""
        if self.size == 1:
            return tensor
        buf = as_buffer(tensor)
        if self.rank == root:
            self.comm.Reduce(MPI.IN_PLACE, buf, op=sum_op(tensor.dtype), root=root)
        else:
            self.comm.Reduce(buf, None, op=sum_op(tensor.dtype), root=root)
        # A binomial tree sends N-1 buffers in all; charge each rank its share.
        self.counter.add(tree_bytes_per_rank(tensor.numel() * tensor.element_size(), self.size))
        return tensor

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Copy ``tensor`` from ``root`` to every rank, in place."""
        if self.size == 1:
            return tensor
        self.comm.Bcast(as_buffer(tensor), root=root)
        self.counter.add(tree_bytes_per_rank(tensor.numel() * tensor.element_size(), self.size))
        return tensor

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather ``tensor`` from every rank; returns shape ``(size, *tensor.shape)``."""
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        if self.size == 1:
            out[0].copy_(tensor)
            return out
        self.comm.Allgather(as_buffer(tensor.contiguous()), as_buffer(out))
        self.counter.add(tensor.numel() * tensor.element_size() * (self.size - 1))
        return out

    def allgatherv(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather 1-D tensors of different lengths from every rank, in rank order."""
        counts = self.allreduce_scalars([0] * self.rank + [tensor.numel()] + [0] * (self.size - self.rank - 1))
        counts = [int(c) for c in counts]
        out = torch.empty(sum(counts), dtype=tensor.dtype)
        if self.size == 1:
            out.copy_(tensor.reshape(-1))
        else:
            displs = [sum(counts[:i]) for i in range(self.size)]
            send = as_buffer(tensor.contiguous())
            recv_array, mpi_type = as_buffer(out)
            self.comm.Allgatherv(send, [recv_array, counts, displs, mpi_type])
            self.counter.add(tensor.numel() * tensor.element_size() * (self.size - 1))
        return list(torch.split(out, counts))

    def allreduce_scalars(self, values: list[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a short vector of float64 control values (counts, losses, flags).

        Args:
            values: the numbers to reduce.
            op: ``sum``, ``max`` or ``min``.
        """
        buf = torch.as_tensor(values, dtype=torch.float64).clone().reshape(-1)
        if self.size > 1:
            mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
            self.comm.Allreduce(MPI.IN_PLACE, as_buffer(buf), op=mpi_op)
            self.counter.add(vendor_allreduce_bytes(buf.numel() * 8, self.size))
        return buf

    def barrier(self) -> None:
        """Block until every rank has called it."""
        self.comm.Barrier()

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a small picklable control object (run directory, flags)."""
        return self.comm.bcast(obj, root=root)

    # Point-to-point

    def send(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """Send a contiguous tensor to ``dest`` (blocking)."""
        self.comm.Send(as_buffer(tensor), dest=dest, tag=tag)
        self.counter.add(tensor.numel() * tensor.element_size())

    def recv(self, tensor: torch.Tensor, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: MPI.Status | None = None) -> torch.Tensor:
        """Receive into a preallocated contiguous tensor (blocking) and return it."""
        self.comm.Recv(as_buffer(tensor), source=source, tag=tag, status=status)
        return tensor

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> MPI.Request:
        """Start sending ``tensor``; keep it alive and unchanged until the request completes."""
        request = self.comm.Isend(as_buffer(tensor), dest=dest, tag=tag)
        self.counter.add(tensor.numel() * tensor.element_size())
        return request

    def irecv(self, tensor: torch.Tensor, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> MPI.Request:
        """Start receiving into ``tensor``; read it only after the request completes."""
        return self.comm.Irecv(as_buffer(tensor), source=source, tag=tag)

    # Node topology

    def node_comm(self) -> Communicator:
        """Return the communicator of the ranks on this rank's node."""
        if self._node is None:
            if self.ranks_per_node > 0:
                sub = self.comm.Split(self.rank // self.ranks_per_node, self.rank)
            else:
                sub = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self._node = Communicator(sub, counter=self.counter)
        return self._node

    def leader_comm(self) -> Communicator | None:
        """Return the communicator of node-local rank 0 of every node, or None off leaders."""
        node = self.node_comm()
        if self._leaders is None:
            color = 0 if node.rank == 0 else MPI.UNDEFINED
            sub = self.comm.Split(color, self.rank)
            self._leaders = Communicator(sub, counter=self.counter) if sub != MPI.COMM_NULL else False
        return self._leaders or None


def vendor_allreduce_bytes(nbytes: int, size: int) -> int:
    """Estimate the bytes one rank sends in MPICH's MPI_Allreduce of ``nbytes``."""
    if size <= 1:
        return 0
    if nbytes <= _VENDOR_SHORT_MSG_BYTES:
        return nbytes * math.ceil(math.log2(size))
    return 2 * (size - 1) * nbytes // size


def tree_bytes_per_rank(nbytes: int, size: int) -> int:
    """Return one rank's share of a binomial-tree broadcast or reduce of ``nbytes``."""
    return (size - 1) * nbytes // size if size > 1 else 0

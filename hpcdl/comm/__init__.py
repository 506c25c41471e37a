"""MPI communication for torch tensors: ring, vendor and hierarchical all-reduce."""

from hpcdl.comm.communicator import ALGORITHMS, ByteCounter, Communicator
from hpcdl.comm.ring import chunk_bounds, ring_allreduce

__all__ = ["ALGORITHMS", "ByteCounter", "Communicator", "chunk_bounds", "ring_allreduce"]

"""Hogwild: lock-free updates to parameters that live in one MPI shared-memory window per node."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hpcdl.comm import Communicator
from hpcdl.strategies.base import Strategy

log = logging.getLogger(__name__)


class HogwildStrategy(Strategy):
    """Train every rank against one copy of the parameters in a shared MPI window.

    ``attach`` allocates the window with ``MPI_Win_allocate_shared`` on the node's
    ranks, copies rank 0's parameters into it, and points every parameter's
    ``.data`` at its slice of the window. Each rank's local optimizer then writes
    its step straight into the shared parameters, without locks, while other
    ranks read and write them. Optimizer state (momentum, Adam moments) stays
    private to each rank.

    Guarantees:
        - Every rank steps the one shared copy, never a private one, so each
          forward pass sees the updates other ranks made up to their last sync.
        - After ``finish`` every rank has bit-identical parameters, because
          they are copied out of one window after a barrier.
        - ``MPI_Win_sync`` after each step makes a rank's writes visible to the
          other ranks of the node.

    Not guaranteed:
        - Atomicity: two ranks updating the same element at once may lose one of
          the two writes (read-modify-write races), as in the Hogwild algorithm.
        - A consistent snapshot: a forward pass may read a mix of old and new
          elements, and runs are not repeatable.
        - Several nodes: every rank must share one node's memory.

    Args:
        comm: the communicator of the training ranks.
    """

    name = "hogwild"

    def __init__(self, comm: Communicator, **kwargs: Any) -> None:
        super().__init__(comm, **kwargs)
        self.window: MPI.Win | None = None
        self.shared: torch.Tensor | None = None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        node = self.comm.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.comm.rank)
        node_size = node.Get_size()
        node.Free()
        if node_size != self.comm.size:
            # NOTE: updates to other nodes through one-sided MPI_Accumulate are not built yet.
            raise RuntimeError(f"hogwild needs all {self.comm.size} ranks on one node, but only {node_size} "
                               "share this rank's memory")

        params = list(model.parameters())
        bad = [str(p.dtype) for p in params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"hogwild shares float32 parameters only; the model has {sorted(set(bad))}")
        numel = sum(p.numel() for p in params)
        nbytes = numel * 4 if self.comm.rank == 0 else 0
        self.window = MPI.Win.Allocate_shared(nbytes, 4, comm=self.comm.comm)
        buffer, _ = self.window.Shared_query(0)
        self.shared = torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=numel))

        if self.comm.rank == 0:
            offset = 0
            for param in params:
                self.shared[offset:offset + param.numel()].copy_(param.detach().reshape(-1))
                offset += param.numel()
        self.comm.barrier()
        offset = 0
        for param in params:
            param.data = self.shared[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        # One passive-target epoch for the whole run, so that Win_sync may order memory.
        self.window.Lock_all(MPI.MODE_NOCHECK)
        log.info("hogwild window of %d parameters shared by %d ranks", numel, self.comm.size)

    def after_step(self) -> None:
        assert self.window is not None
        self.window.Sync()

    def finish(self) -> None:
        """Wait for every rank, copy the shared parameters into private memory, and free the window."""
        if self.window is None:
            return
        self.window.Sync()
        self.comm.barrier()
        for param in self.model.parameters():
            param.data = param.data.clone()
        self.window.Unlock_all()
        self.window.Free()
        self.window = None
        self.shared = None
        # Buffers (BatchNorm statistics) are private; copy rank 0's.
        for buffer in self.model.buffers():
            self.comm.broadcast(buffer.data, root=0)

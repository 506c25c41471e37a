"""Hogwild: lock-free updates to parameters in per-node shared memory, combined across nodes by MPI_Accumulate."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hpcdl.comm import Communicator
from hpcdl.comm.buffers import as_buffer
from hpcdl.comm.ring import chunk_bounds
from hpcdl.strategies.base import Strategy

log = logging.getLogger(__name__)


class HogwildStrategy(Strategy):
    """Train every rank against shared parameters that each rank updates without locks.

    The flat float32 parameter vector is split into one contiguous slice per node
    (the groups of ``comm.node_comm()``), balanced by elements. Each node owns
    one slice and keeps it in an ``MPI_Win_allocate_shared`` window that all of
    its ranks map. With several nodes, the node leader (node rank 0) also exposes
    that memory to the other nodes through an ``MPI_Win_create`` window over the
    training communicator. Every rank keeps one ``Lock_all`` epoch open on each
    window for the whole run.

    The model's parameters stay in private memory on each rank, so one forward
    and backward pass sees one set of values. Per optimizer step a rank:

    1. records its parameters, runs its local optimizer (whose state, such as
       momentum or Adam moments, stays private), and takes the float32
       difference ``after - before``, which contains only this rank's update;
    2. adds that update to its own node's slice with plain loads and stores,
       without locks, as in the Hogwild algorithm, writing only the elements
       the update changed;
    3. sends the update of every other node's slice with ``MPI_Accumulate``
       (``MPI_SUM``) to that node's leader, skipping slices it left unchanged;
    4. reads every other node's slice with ``MPI_Get_accumulate``
       (``MPI_NO_OP``), waits for all operations with ``MPI_Win_flush_all``, and
       copies its own node's slice from the shared window.

    Each rank keeps two private copies of the parameter vector (the values and
    the step's update), and each node keeps its slice once.

    Guarantees:
        - Accumulates lose no update: concurrent ``MPI_Accumulate`` calls with
          one operation on one element take effect one after another, in some
          order (MPI-3.0, section 11.7). A slice that only other nodes update
          ends with the float32 sum of all their updates.
        - Reads of remote slices are atomic per element with respect to those
          accumulates, because they use ``MPI_Get_accumulate``, not ``MPI_Get``.
        - A rank's read of a remote slice follows its own accumulate to that
          slice, because MPI orders accumulate operations from one origin to
          the same target locations. Its next forward pass includes its own
          last update.
        - After ``finish`` every rank has bit-identical parameters: after a
          barrier that follows every rank's last update, each node leader
          broadcasts its slice.

    Not guaranteed:
        - Atomicity inside a node: two ranks adding to one element of their
          node's slice at once may lose one of the two adds. A local add that
          overlaps a remote accumulate to that element may lose either, as MPI
          leaves concurrent stores and accumulates to one location undefined.
        - Freshness: a forward pass uses the values read at the end of this
          rank's previous step. Remote slices miss every accumulate that had not
          completed at the owner when the read ran, and the node's own slice may
          mix old and new elements.
        - Repeatability: results depend on timing and differ from run to run.

    The windows must use MPI's unified memory model (``MPI_WIN_UNIFIED``), in
    which loads, stores and RMA operations act on one copy of the memory.
    ``attach`` raises if MPI reports the separate model.

    To restore a checkpoint, load the model's state before the optimizer's:
    ``load_state_dict`` then copies rank 0's parameters into the shared slices.

    Args:
        comm: the communicator of the training ranks.
    """

    name = "hogwild"

    def __init__(self, comm: Communicator, **kwargs: Any) -> None:
        super().__init__(comm, **kwargs)
        self.node_window: MPI.Win | None = None
        self.remote_window: MPI.Win | None = None
        # Private parameters, with every model parameter a view into this vector.
        self.flat: torch.Tensor | None = None
        # The parameters before a step, turned in place into this rank's update by after_step.
        self.delta: torch.Tensor | None = None
        self.shared: torch.Tensor | None = None
        self.bounds: list[tuple[int, int]] = []
        self.owners: list[int] = []
        self.node_index = 0

    # Set-up

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        params = list(model.parameters())
        bad = [str(p.dtype) for p in params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"hogwild shares float32 parameters only; the model has {sorted(set(bad))}")
        numel = sum(p.numel() for p in params)

        self.flat = torch.empty(numel, dtype=torch.float32)
        offset = 0
        for param in params:
            self.flat[offset:offset + param.numel()].copy_(param.detach().reshape(-1))
            param.data = self.flat[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        self.delta = torch.empty_like(self.flat)

        node = self.comm.node_comm()
        self.owners, self.node_index = self._find_node_leaders()
        self.bounds = chunk_bounds(numel, len(self.owners))
        start, end = self.bounds[self.node_index]

        # The leader allocates the node's slice; the other ranks of the node map it.
        self.node_window = MPI.Win.Allocate_shared((end - start) * 4 if node.rank == 0 else 0, 4,
                                                   comm=node.comm)
        memory, _ = self.node_window.Shared_query(0)
        self.shared = torch.from_numpy(np.frombuffer(memory, dtype=np.float32, count=end - start))
        require_unified_model(self.node_window, "shared-memory")
        if len(self.owners) > 1:
            exposed = memory if node.rank == 0 else None
            self.remote_window = MPI.Win.Create(exposed, 4, comm=self.comm.comm)
            require_unified_model(self.remote_window, "remote-access")

        # One passive-target epoch per window for the whole run.
        self.node_window.Lock_all(MPI.MODE_NOCHECK)
        if self.remote_window is not None:
            self.remote_window.Lock_all(MPI.MODE_NOCHECK)
        self._publish()
        log.info("hogwild: %d parameters in %d node slices; node %d (%d ranks) owns elements [%d, %d)",
                 numel, len(self.owners), self.node_index, node.size, start, end)

    def _find_node_leaders(self) -> tuple[list[int], int]:
        """Return the training-communicator rank of every node's leader and this rank's node index."""
        node = self.comm.node_comm()
        leaders = self.comm.leader_comm()
        info = None
        if leaders is not None:
            info = (leaders.comm.allgather(self.comm.rank), leaders.rank)
        owners, node_index = node.bcast_object(info, root=0)
        return owners, node_index

    def _publish(self) -> None:
        """Copy rank 0's parameters to every rank and into every node's slice; collective."""
        assert self.node_window is not None, "attach() must run first"
        self.comm.broadcast(self.flat, root=0)
        if self.comm.node_comm().rank == 0:
            start, end = self.bounds[self.node_index]
            self.shared.copy_(self.flat[start:end])
        self.node_window.Sync()
        self.comm.barrier()
        self.node_window.Sync()

    # Per step

    def step(self, closure=None) -> Any:
        """Record the parameters, run the base step, and read the current shared values."""
        assert self.node_window is not None, "attach() must run first"
        # Record the parameters here, not at the last refresh, so that changes made
        # between steps (such as loading a checkpoint) never count as this rank's update.
        self.delta.copy_(self.flat)
        result = super().step(closure)
        self._refresh()
        return result

    def after_step(self) -> None:
        """Push this rank's update: add it to the node's slice and accumulate it into the other nodes'."""
        assert self.node_window is not None, "attach() must run first"
        torch.sub(self.flat, self.delta, out=self.delta)
        start, end = self.bounds[self.node_index]
        _add_changed(self.shared, self.delta[start:end])
        self.node_window.Sync()
        for owner, (first, last) in self._remote_slices():
            remote_delta = self.delta[first:last]
            if not bool(remote_delta.any()):
                continue
            # The delta must stay unchanged until the flush in _refresh completes the operation.
            self.remote_window.Accumulate(as_buffer(remote_delta), owner, op=MPI.SUM)
            self.comm.counter.add(remote_delta.numel() * remote_delta.element_size())

    def _refresh(self) -> None:
        """Copy the current shared values of every slice into this rank's parameters."""
        assert self.node_window is not None, "attach() must run first"
        if self.remote_window is not None:
            for owner, (first, last) in self._remote_slices():
                # MPI_NO_OP ignores the origin buffer. Unlike MPI_Get, this read is
                # atomic per element with respect to concurrent accumulates.
                self.remote_window.Get_accumulate([None, 0, MPI.FLOAT], as_buffer(self.flat[first:last]), owner,
                                                  target=[0, last - first, MPI.FLOAT], op=MPI.NO_OP)
            # NOTE: with MPICH 5.0.2 (ch4:ucx, measured on one machine) an operation on a
            # window from MPI_Win_create completes only when the target process enters MPI,
            # so this flush can wait up to one step of another node's leader. Flush_all
            # makes MPI progress even with nothing pending, so a leader applies what others sent.
            self.remote_window.Flush_all()
        self.node_window.Sync()
        start, end = self.bounds[self.node_index]
        self.flat[start:end].copy_(self.shared)

    def _remote_slices(self) -> list[tuple[int, tuple[int, int]]]:
        """Return (owner rank, slice bounds) for every non-empty slice that another node owns."""
        return [(self.owners[index], bounds) for index, bounds in enumerate(self.bounds)
                if index != self.node_index and bounds[1] > bounds[0]]

    # End of the run

    def finish(self) -> None:
        """Wait for every rank, give all ranks the owners' slices bit for bit, and free the windows."""
        if self.node_window is None:
            return
        # Every rank flushed its accumulates and synced its local adds in its last
        # step, so after this barrier and Win_sync the owned slices are final.
        self.comm.barrier()
        self.node_window.Sync()
        start, end = self.bounds[self.node_index]
        if self.comm.node_comm().rank == 0:
            self.flat[start:end].copy_(self.shared)
        for owner, (first, last) in zip(self.owners, self.bounds):
            self.comm.broadcast(self.flat[first:last], root=owner)
        # Separate storage per parameter, as safetensors rejects tensors that share memory.
        for param in self.model.parameters():
            param.data = param.data.clone()
        self.flat = None
        self.delta = None
        self._free_windows()
        # Buffers (BatchNorm statistics) are private; copy rank 0's.
        for buffer in self.model.buffers():
            self.comm.broadcast(buffer.data, root=0)

    def _free_windows(self) -> None:
        for window in (self.remote_window, self.node_window):
            if window is not None:
                window.Unlock_all()
                window.Free()
        self.remote_window = None
        self.node_window = None
        self.shared = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the strategy's counters, then share rank 0's parameters, loaded before this call."""
        super().load_state_dict(state)
        if self.node_window is not None:
            self._publish()


def _add_changed(shared: torch.Tensor, delta: torch.Tensor) -> None:
    """Add ``delta`` into ``shared`` with plain loads and stores, writing only the elements it changes.

    The read-modify-write is not atomic: an update that another process makes to
    an element between the load and the store is lost. Skipping zero elements
    keeps a rank that did not change an element from writing back an old value.
    """
    changed = delta.nonzero().squeeze(1)
    if changed.numel() == delta.numel():
        shared.add_(delta)
    elif changed.numel() > 0:
        shared.index_add_(0, changed, delta.index_select(0, changed))


def require_unified_model(window: MPI.Win, role: str) -> None:
    """Raise unless ``window`` uses the unified memory model that lock-free loads and stores need."""
    if window.model != MPI.WIN_UNIFIED:
        raise RuntimeError(f"hogwild needs the unified MPI memory model, but the {role} window uses the "
                           "separate model, in which loads and stores do not see RMA updates without "
                           "exclusive locks. Use an MPI library that provides MPI_WIN_UNIFIED.")

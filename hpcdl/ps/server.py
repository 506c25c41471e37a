"""One parameter-server shard: receives pushes, applies them one at a time, serves pulls."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from mpi4py import MPI

from hpcdl.comm import Communicator
from hpcdl.compression import build_compressor
from hpcdl.compression.base import unpack
from hpcdl.ps import protocol as p
from hpcdl.ps.optimizer import ServerOptimizer

log = logging.getLogger(__name__)

# How long a shard waits for the payload that a header announced.
_PAYLOAD_WAIT_S = 10.0


class WorkerTimeout(RuntimeError):
    """A worker the job cannot go on without sent nothing within the timeout."""


class PeerUnreachable(RuntimeError):
    """A message to or from one worker did not complete within the timeout."""


@dataclass
class ServerSettings:
    """The part of a run's config that a shard needs.

    Args:
        mode: ``async``, ``ssp`` or ``bsp``.
        staleness: the ``ssp`` bound in clocks.
        staleness_lr: in ``async``, divide the learning rate by the push's staleness.
        compression: the compressor spec of the pushes; the shard decodes each
            push with it. ``none`` takes float32 gradients.
        timeout_s: how long a worker that has not finished may send nothing. In
            ``ssp`` and ``bsp`` the job then fails; in ``async`` the shard counts the
            worker as lost and serves the others without it.
    """

    mode: str
    staleness: int = 0
    staleness_lr: bool = False
    timeout_s: float = 120.0
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    compression: str = "none"


class ShardServer:
    """Serve one shard of the parameters to every worker until all of them finish.

    Requests are handled one at a time in arrival order, so no two pushes ever
    interleave and none is lost. A request that fails validation is logged and
    rejected with an error status sent to its sender, and the shard keeps serving.

    The shard replies to DONE only when every worker is done or lost. The
    reply carries the final parameters and the shard's statistics, so all
    workers finish with the same model without a collective between them.

    Args:
        comm: the communicator that carries parameter-server traffic.
        shard: this shard's index.
        worker_ranks: ranks of ``comm`` that train.
        settings: mode and optimizer settings.
    """

    def __init__(self, comm: Communicator, shard: int, worker_ranks: list[int],
                 settings: ServerSettings) -> None:
        self.comm = comm
        self.shard = shard
        self.workers = list(worker_ranks)
        self.settings = settings
        compressor = build_compressor(settings.compression)
        self.compressor = compressor if compressor.name != "none" else None
        # Set at INIT when pushes are compressed: the shard's tensor shapes and payload layout.
        self.shapes: list[tuple[int, ...]] | None = None
        self.push_layout: list[tuple[torch.dtype, int]] | None = None
        self.push_nbytes: int | None = None
        self.params: torch.Tensor | None = None
        self.optimizer: ServerOptimizer | None = None
        self.version = 0
        self.clocks = {w: 0 for w in self.workers}
        self.done: set[int] = set()
        self.lost: set[int] = set()
        self.bytes_received = 0
        self.last_seen = {w: time.monotonic() for w in self.workers}
        self.pending_pulls: list[int] = []
        self.finish_sent = False
        self.round_sum: torch.Tensor | None = None
        self.round_count = 0
        self.round_lr = 0.0
        self.pushes = 0
        self.rejected = 0
        self.staleness_counts = torch.zeros(p.HISTOGRAM_BINS, dtype=torch.float64)
        self.clock_gap_counts = torch.zeros(p.HISTOGRAM_BINS, dtype=torch.float64)
        self.first_push_time: float | None = None
        self.last_push_time: float | None = None

    # The loop

    def serve(self) -> int:
        """Handle requests until every worker has sent DONE or is lost; return the number lost."""
        log.info("shard %d serving %d workers in %s mode", self.shard, len(self.workers), self.settings.mode)
        status = MPI.Status()
        idle_since = time.monotonic()
        while len(self.done | self.lost) < len(self.workers) or not self.finish_sent:
            if self.comm.comm.Iprobe(MPI.ANY_SOURCE, p.TAG_REQUEST, status):
                source = status.Get_source()
                try:
                    self._handle(source, status.Get_count(MPI.BYTE))
                except (MPI.Exception, PeerUnreachable) as exc:
                    self._lose(source, f"communication failed: {exc}")
                idle_since = time.monotonic()
            else:
                self._check_timeouts()
                p.pause(idle_since)
        log.info("shard %d finished: version %d, %d pushes, %d rejected requests, %d workers lost",
                 self.shard, self.version, self.pushes, self.rejected, len(self.lost))
        return len(self.lost)

    def _handle(self, source: int, header_nbytes: int) -> None:
        if source in self.last_seen:
            self.last_seen[source] = time.monotonic()
        if header_nbytes % 8:
            # A header whose length is not a whole number of float64 values.
            scratch = bytearray(header_nbytes)
            self.comm.comm.Recv([scratch, MPI.BYTE], source=source, tag=p.TAG_REQUEST)
            self._reject(source, p.Status.BAD_HEADER, f"{header_nbytes} header bytes")
            return
        raw = torch.empty(header_nbytes // 8, dtype=torch.float64)
        self._recv(raw, source, p.TAG_REQUEST)
        self.bytes_received += header_nbytes
        header = raw.tolist()

        payload = None
        if p.request_kind(header) in p.KINDS_WITH_PAYLOAD:
            payload = self._receive_payload(source)
            if payload is None:
                self._reject(source, p.Status.BAD_LENGTH, "no payload followed the header")
                return
        verdict = p.validate_request(header, source, None if payload is None else payload[1], self._view())
        if verdict != p.Status.OK:
            self._reject(source, verdict, f"header {header}")
            return

        kind = p.Kind(int(header[p.KIND]))
        data = payload[0] if payload is not None else None
        if kind == p.Kind.INIT:
            self._init(source, data.view(p.PAYLOAD_DTYPE))
        elif kind == p.Kind.PUSH_PULL:
            self._push(source, header, self._decode(data))
        elif kind == p.Kind.PULL:
            self._reply_params(source)
        elif kind == p.Kind.STATS:
            self._reply_stats(source)
        elif kind == p.Kind.STATE_GET:
            self._reply_state(source)
        elif kind == p.Kind.STATE_SET:
            self._load_state(source)
        elif kind == p.Kind.DONE:
            self.done.add(source)
            log.info("shard %d: worker rank %d finished at clock %d", self.shard, source, self.clocks[source])
            self._release_pulls()
            self._maybe_finish()

    def _receive_payload(self, source: int) -> tuple[torch.Tensor, int] | None:
        """Receive the payload that follows a header; return (its bytes as uint8, byte length)."""
        if not self._wait_for(source, p.TAG_REQUEST_DATA):
            return None
        status = MPI.Status()
        self.comm.comm.Probe(source, p.TAG_REQUEST_DATA, status)
        nbytes = status.Get_count(MPI.BYTE)
        self.bytes_received += nbytes
        # uint8 storage is aligned for any dtype, so a float32 payload is viewed in place.
        data = torch.empty(nbytes, dtype=torch.uint8)
        self._recv(data, source, p.TAG_REQUEST_DATA)
        return data, nbytes

    def _wait_for(self, source: int, tag: int) -> bool:
        """Wait until a message from ``source`` with ``tag`` arrives; False after ``_PAYLOAD_WAIT_S``."""
        start = time.monotonic()
        while not self.comm.comm.Iprobe(source, tag):
            if time.monotonic() > start + _PAYLOAD_WAIT_S:
                return False
            p.pause(start)
        return True

    def _decode(self, data: torch.Tensor) -> torch.Tensor:
        """Return the dense float32 gradient a validated push payload carries."""
        if self.compressor is None:
            return data.view(p.PAYLOAD_DTYPE)
        return self.compressor.decode(f"push/shard{self.shard}", unpack(data, self.push_layout),
                                      self.params.numel(), shapes=self.shapes)

    def _view(self) -> p.ShardView:
        return p.ShardView(shard=self.shard, numel=None if self.params is None else self.params.numel(),
                           version=self.version, worker_ranks=frozenset(self.workers),
                           init_rank=self.workers[0],
                           next_clock={w: c + 1 for w, c in self.clocks.items()},
                           done=frozenset(self.done), lost=frozenset(self.lost), push_nbytes=self.push_nbytes)

    # Requests

    def _init(self, source: int, data: torch.Tensor) -> None:
        if self.compressor is not None:
            # The shard's tensor shapes follow as one small control message.
            if not self._wait_for(source, p.TAG_CONTROL):
                self._reject(source, p.Status.BAD_HEADER, "compressed pushes need the shard's tensor shapes")
                return
            shapes = [tuple(int(d) for d in shape) for shape in self.comm.comm.recv(source=source, tag=p.TAG_CONTROL)]
            if sum(math.prod(shape) for shape in shapes) != data.numel():
                self._reject(source, p.Status.BAD_SHAPE, f"tensor shapes {shapes} do not cover {data.numel()} elements")
                return
            self.shapes = shapes
            self.push_layout = self.compressor.payload_layout(data.numel(), shapes=shapes)
            self.push_nbytes = self.compressor.encoded_nbytes(data.numel(), shapes=shapes)
        self.params = data.clone()
        s = self.settings
        self.optimizer = ServerOptimizer(self.params, s.optimizer, momentum=s.momentum,
                                         nesterov=s.nesterov, weight_decay=s.weight_decay)
        self.last_seen = {w: time.monotonic() for w in self.workers}
        log.info("shard %d initialized with %d elements", self.shard, self.params.numel())
        self._reply(source, p.Status.OK)

    def _push(self, source: int, header: list[float], grad: torch.Tensor) -> None:
        staleness = self.version - int(header[p.VERSION])
        self._count(self.staleness_counts, staleness)
        self.clocks[source] = int(header[p.CLOCK])
        self.pushes += 1
        self.last_push_time = time.monotonic()
        if self.first_push_time is None:
            self.first_push_time = self.last_push_time
        lr = header[p.LR]
        mode = self.settings.mode

        if mode == "bsp":
            self._add_to_round(grad, lr)
        else:
            if mode == "async" and self.settings.staleness_lr and staleness > 1:
                lr = lr / staleness
            self.optimizer.step(grad, lr)
            self.version += 1

        self.pending_pulls.append(source)
        self._release_pulls()

    def _add_to_round(self, grad: torch.Tensor, lr: float) -> None:
        if self.round_sum is None:
            self.round_sum = grad.clone()
        else:
            self.round_sum.add_(grad)
        self.round_count += 1
        self.round_lr = lr
        self._maybe_close_round()

    def _maybe_close_round(self) -> None:
        """Apply the summed round once every unfinished worker has pushed this clock."""
        live = self._live()
        if self.round_sum is None or self.round_count < len(live):
            return
        self.optimizer.step(self.round_sum, self.round_lr)
        self.version += 1
        self.round_sum = None
        self.round_count = 0

    def _release_pulls(self) -> None:
        """Reply to every pending pull whose worker may proceed under the mode's bound."""
        if self.settings.mode == "bsp":
            self._maybe_close_round()
        live_clocks = [self.clocks[w] for w in self._live()]
        slowest = min(live_clocks) if live_clocks else 0
        still_waiting = []
        for worker in self.pending_pulls:
            gap = self.clocks[worker] - slowest
            if self.settings.mode == "ssp" and gap > self.settings.staleness:
                still_waiting.append(worker)
                continue
            if self.settings.mode == "bsp" and self.round_count > 0:
                still_waiting.append(worker)
                continue
            self._count(self.clock_gap_counts, max(gap, 0))
            self._reply_params(worker)
        self.pending_pulls = still_waiting

    # Replies

    def _reply(self, dest: int, status: p.Status, numel: int = 0) -> None:
        reply = torch.tensor([int(status), self.version, numel, self.clocks.get(dest, 0)], dtype=torch.float64)
        self._send(reply, dest, p.TAG_REPLY)

    def _reply_params(self, dest: int) -> None:
        self._reply(dest, p.Status.OK, self.params.numel())
        self._send(self.params, dest, p.TAG_REPLY_DATA)

    def _send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        """Send to one worker; raise PeerUnreachable when it does not complete within the timeout.

        A worker posts its reply receives before it sends a request, so a send
        to a live worker completes at once. A send to a dead worker never does.
        """
        self._complete(self.comm.isend(tensor, dest, tag=tag), dest, "send to")

    def _recv(self, tensor: torch.Tensor, source: int, tag: int) -> None:
        """Receive from one worker; raise PeerUnreachable when it does not complete within the timeout."""
        self._complete(self.comm.irecv(tensor, source=source, tag=tag), source, "receive from")

    def _complete(self, request: MPI.Request, peer: int, action: str) -> None:
        start = time.monotonic()
        deadline = start + self.settings.timeout_s
        while not request.Test():
            p.pause(start)
            if time.monotonic() > deadline:
                raise PeerUnreachable(f"{action} world rank {peer} did not complete in "
                                      f"{self.settings.timeout_s:g} s (ps_timeout_s)")

    def _stats(self) -> torch.Tensor:
        # Seconds from the first push to the last, so set-up and idle time do not count.
        elapsed_s = (self.last_push_time - self.first_push_time) if self.first_push_time is not None else 0.0
        scalars = [0.0] * p.STATS_SCALARS
        scalars[p.S_PUSHES] = self.pushes
        scalars[p.S_ELAPSED_S] = elapsed_s
        scalars[p.S_REJECTED] = self.rejected
        scalars[p.S_VERSION] = self.version
        scalars[p.S_BYTES_RECEIVED] = self.bytes_received
        scalars[p.S_LOST_WORKERS] = len(self.lost)
        return torch.cat([torch.tensor(scalars, dtype=torch.float64), self.staleness_counts, self.clock_gap_counts])

    def _reply_stats(self, dest: int) -> None:
        stats = self._stats()
        self._reply(dest, p.Status.OK, stats.numel())
        self._send(stats, dest, p.TAG_REPLY_DATA)

    def _maybe_finish(self) -> None:
        """Once every worker is done or lost, send each done worker the final parameters and statistics."""
        if self.finish_sent or len(self.done | self.lost) < len(self.workers):
            return
        stats = self._stats()
        for worker in sorted(self.done):
            try:
                self._reply_params(worker)
                self._send(stats, worker, p.TAG_REPLY_STATS)
            except (MPI.Exception, PeerUnreachable) as exc:
                log.warning("shard %d: the final reply to world rank %d failed: %s", self.shard, worker, exc)
        self.finish_sent = True

    def _reply_state(self, dest: int) -> None:
        flat, meta = self.optimizer.state_flat()
        meta.update({"version": self.version, "pushes": self.pushes, "bytes_received": self.bytes_received,
                     "clocks": {str(w): c for w, c in self.clocks.items()},
                     "staleness_counts": self.staleness_counts.tolist(),
                     "clock_gap_counts": self.clock_gap_counts.tolist()})
        self._reply(dest, p.Status.OK, flat.numel())
        self._send(flat, dest, p.TAG_REPLY_DATA)
        # Small control values (counters, flags) go as one pickled object.
        self.comm.comm.send(meta, dest=dest, tag=p.TAG_CONTROL)

    def _load_state(self, source: int) -> None:
        meta = self.comm.comm.recv(source=source, tag=p.TAG_CONTROL)
        flat = torch.empty(int(meta["numel"]), dtype=p.PAYLOAD_DTYPE)
        self.comm.recv(flat, source=source, tag=p.TAG_REQUEST_DATA)
        self.optimizer.load_state_flat(flat, meta)
        self.version = int(meta["version"])
        self.pushes = int(meta["pushes"])
        self.bytes_received = int(meta.get("bytes_received", self.bytes_received))
        self.clocks.update({int(w): int(c) for w, c in meta["clocks"].items()})
        self.staleness_counts = torch.tensor(meta["staleness_counts"], dtype=torch.float64)
        self.clock_gap_counts = torch.tensor(meta["clock_gap_counts"], dtype=torch.float64)
        log.info("shard %d restored at version %d", self.shard, self.version)
        self._reply(source, p.Status.OK)

    def _reject(self, source: int, status: p.Status, detail: str) -> None:
        self.rejected += 1
        log.warning("shard %d rejected a request from rank %d: %s (%s)", self.shard, source,
                    p.STATUS_MESSAGES.get(status, status.name), detail)
        self._reply(source, status)

    # Bookkeeping

    @staticmethod
    def _count(histogram: torch.Tensor, value: int) -> None:
        histogram[min(max(value, 0), p.HISTOGRAM_BINS - 1)] += 1

    def _live(self) -> list[int]:
        return [w for w in self.workers if w not in self.done and w not in self.lost]

    def _check_timeouts(self) -> None:
        if self.params is None:
            return
        now = time.monotonic()
        for worker in self._live():
            if worker in self.pending_pulls:
                continue
            silent_s = now - self.last_seen[worker]
            if silent_s <= self.settings.timeout_s:
                continue
            self._lose(worker, f"it sent nothing for {silent_s:.1f} s (ps_timeout_s={self.settings.timeout_s:g}) "
                               f"at clock {self.clocks[worker]}")

    def _lose(self, worker: int, reason: str) -> None:
        """Go on without ``worker`` in ``async``; otherwise end the job with an error that names it.

        Worker 0 writes the run's outputs and checkpoints, so no mode goes on without it.
        """
        if worker not in self.workers:
            raise WorkerTimeout(f"shard {self.shard}: world rank {worker} is not a worker, and {reason}")
        name = f"worker {self.workers.index(worker)} (world rank {worker})"
        if self.settings.mode != "async" or worker == self.workers[0]:
            needed_by = "it writes the run's outputs" if self.settings.mode == "async" else self.settings.mode
            raise WorkerTimeout(f"{name} is unreachable: {reason}. The job cannot go on without it ({needed_by}); "
                                f"if the worker is alive but slow, raise --ps-timeout-s")
        # In async the workers do not wait for each other, so the others go on.
        self.lost.add(worker)
        if worker in self.pending_pulls:
            self.pending_pulls.remove(worker)
        log.warning("shard %d: %s is lost: %s; serving the other workers without it", self.shard, name, reason)
        self._maybe_finish()

"""The worker side of the parameter server: push gradients to every shard and pull parameters."""

from __future__ import annotations

import time
from typing import Any

import torch
from mpi4py import MPI

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor
from hpcdl.compression.base import pack
from hpcdl.ps import protocol as p


class PSClient:
    """Send requests to every shard at once and wait for all replies.

    Requests to different shards overlap: every header, payload and reply
    receive of one call is posted before the first wait.

    Args:
        comm: the communicator that carries parameter-server traffic.
        server_ranks: shard i lives on ``server_ranks[i]``.
        numel: total float32 elements of the flattened parameters.
        timeout_s: how long to wait for a reply before raising.
        compressor: encodes each push (with error feedback, per shard); None
            sends float32 gradients. The shards must decode with the same spec.
        shapes: the shapes of the tensors in the flattened parameters, in
            order; a compressor that treats matrices apart needs them.
    """

    def __init__(self, comm: Communicator, server_ranks: list[int], numel: int, *,
                 timeout_s: float = 240.0, compressor: Compressor | None = None,
                 shapes: list[tuple[int, ...]] | None = None) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.servers = list(server_ranks)
        self.bounds = p.shard_bounds(numel, len(self.servers))
        self.timeout_s = timeout_s
        self.versions = [0] * len(self.servers)
        self.compressor = compressor if compressor is not None and compressor.name != "none" else None
        self.shard_shapes = p.shard_shapes(shapes or [(numel,)], self.bounds)

    def _slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[start:end] for start, end in self.bounds]

    def request(self, kind: p.Kind, *, send: torch.Tensor | None = None, receive: torch.Tensor | None = None,
                clock: int = 0, lr: float = 0.0, encoded: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Send one request of ``kind`` to every shard; return the reply headers.

        Args:
            send: flat float32 tensor whose shard slices are the payloads.
            receive: flat float32 tensor whose shard slices receive the reply payloads.
            encoded: with ``send``, one packed compressor payload per shard to
                send in place of the slices.

        Raises:
            ParameterServerError: a shard rejected the request or did not reply in time.
        """
        sends = self._slices(send) if send is not None else [None] * len(self.servers)
        receives = self._slices(receive) if receive is not None else [None] * len(self.servers)
        replies = [torch.empty(p.REPLY_FIELDS, dtype=torch.float64) for _ in self.servers]
        reply_requests, data_requests, send_requests, keep = [], [], [], []
        for shard, server in enumerate(self.servers):
            reply_requests.append(self.comm.irecv(replies[shard], source=server, tag=p.TAG_REPLY))
            if receives[shard] is not None:
                data_requests.append(self.comm.irecv(receives[shard], source=server, tag=p.TAG_REPLY_DATA))
            numel = sends[shard].numel() if sends[shard] is not None else 0
            payload = encoded[shard] if encoded is not None else sends[shard]
            header = p.make_header(kind, shard, self.rank, numel=numel, version=self.versions[shard],
                                   clock=clock, lr=lr,
                                   encoded_nbytes=payload.numel() if encoded is not None else None)
            keep.append(header)
            send_requests.append(self.comm.isend(header, server, tag=p.TAG_REQUEST))
            if payload is not None:
                send_requests.append(self.comm.isend(payload, server, tag=p.TAG_REQUEST_DATA))

        self._wait(reply_requests + send_requests, kind)
        if any(int(reply[p.R_STATUS]) != p.Status.OK for reply in replies):
            for request in data_requests:
                request.Cancel()
                request.Wait()
            self._raise_if_rejected(replies, kind)
        self._wait(data_requests, kind)
        return replies

    def _raise_if_rejected(self, replies: list[torch.Tensor], kind: p.Kind) -> None:
        for shard, reply in enumerate(replies):
            status = p.Status(int(reply[p.R_STATUS]))
            if status != p.Status.OK:
                raise p.ParameterServerError(
                    f"parameter-server shard {shard} (rank {self.servers[shard]}) rejected the {kind.name} "
                    f"request of rank {self.rank}: {p.STATUS_MESSAGES.get(status, status.name)}")

    def _wait(self, requests: list[MPI.Request], kind: p.Kind) -> None:
        start = time.monotonic()
        deadline = start + self.timeout_s
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                raise p.ParameterServerError(
                    f"rank {self.rank} timed out after {self.timeout_s:g} s waiting for the parameter server "
                    f"(ranks {self.servers}) to reply to its {kind.name} request. In async, a worker silent "
                    f"for longer than ps_timeout_s is counted as lost, and the shards may have finished "
                    f"without it: raise --ps-timeout-s")
            p.pause(start)

    def init(self, flat_params: torch.Tensor) -> None:
        """Send the initial parameters to every shard (first worker only).

        With a compressor, each shard also receives the shapes of its tensors,
        which it needs to decode pushes.
        """
        if self.compressor is None:
            self.request(p.Kind.INIT, send=flat_params)
            return
        replies = [torch.empty(p.REPLY_FIELDS, dtype=torch.float64) for _ in self.servers]
        waits = [self.comm.irecv(reply, source=server, tag=p.TAG_REPLY) for reply, server in zip(replies, self.servers)]
        for shard, (server, piece) in enumerate(zip(self.servers, self._slices(flat_params))):
            self.comm.send(p.make_header(p.Kind.INIT, shard, self.rank, numel=piece.numel()), server, tag=p.TAG_REQUEST)
            self.comm.send(piece.contiguous(), server, tag=p.TAG_REQUEST_DATA)
            # Shapes are a few integers of control data, not tensor data.
            self.comm.comm.send(self.shard_shapes[shard], dest=server, tag=p.TAG_CONTROL)
        self._wait(waits, p.Kind.INIT)
        self._raise_if_rejected(replies, p.Kind.INIT)

    def push_pull(self, flat_grad: torch.Tensor, flat_params: torch.Tensor, clock: int, lr: float) -> None:
        """Push one gradient to every shard and receive the parameters each shard then releases."""
        encoded = None
        if self.compressor is not None:
            encoded = [pack(self.compressor.encode(f"push/shard{shard}", piece, shapes=self.shard_shapes[shard]))
                       for shard, piece in enumerate(self._slices(flat_grad))]
        replies = self.request(p.Kind.PUSH_PULL, send=flat_grad, receive=flat_params, clock=clock, lr=lr,
                               encoded=encoded)
        self.versions = [int(reply[p.R_VERSION]) for reply in replies]

    def pull(self, flat_params: torch.Tensor) -> None:
        """Receive the current parameters of every shard into ``flat_params``."""
        replies = self.request(p.Kind.PULL, receive=flat_params)
        self.versions = [int(reply[p.R_VERSION]) for reply in replies]

    def stats(self) -> list[torch.Tensor]:
        """Return each shard's statistics vector (see ``protocol.STATS_FIELDS``)."""
        return [self._query(shard, server, p.Kind.STATS, torch.float64)
                for shard, server in enumerate(self.servers)]

    def get_state(self) -> list[dict[str, Any]]:
        """Return every shard's parameters, optimizer state and counters, for a checkpoint."""
        out = []
        for shard, server in enumerate(self.servers):
            flat = self._query(shard, server, p.Kind.STATE_GET, p.PAYLOAD_DTYPE)
            meta = self.comm.comm.recv(source=server, tag=p.TAG_CONTROL)
            out.append({"flat": flat, "meta": meta})
        return out

    def _query(self, shard: int, server: int, kind: p.Kind, dtype: torch.dtype) -> torch.Tensor:
        """Send a header-only request to one shard and receive its reply payload."""
        header = torch.empty(p.REPLY_FIELDS, dtype=torch.float64)
        request = self.comm.irecv(header, source=server, tag=p.TAG_REPLY)
        self.comm.send(p.make_header(kind, shard, self.rank), server, tag=p.TAG_REQUEST)
        self._wait([request], kind)
        payload = torch.empty(int(header[p.R_NUMEL]), dtype=dtype)
        self._wait([self.comm.irecv(payload, source=server, tag=p.TAG_REPLY_DATA)], kind)
        return payload

    def set_state(self, shards: list[dict[str, Any]]) -> None:
        """Restore what ``get_state`` returned (first worker only)."""
        if len(shards) != len(self.servers):
            raise ValueError(f"the checkpoint has {len(shards)} shards but the job has {len(self.servers)} "
                             f"server ranks; resume with the same --ps-ranks")
        for shard, (server, state) in enumerate(zip(self.servers, shards)):
            header = torch.empty(p.REPLY_FIELDS, dtype=torch.float64)
            request = self.comm.irecv(header, source=server, tag=p.TAG_REPLY)
            self.comm.send(p.make_header(p.Kind.STATE_SET, shard, self.rank), server, tag=p.TAG_REQUEST)
            self.comm.comm.send(state["meta"], dest=server, tag=p.TAG_CONTROL)
            self.comm.send(state["flat"].contiguous(), server, tag=p.TAG_REQUEST_DATA)
            self._wait([request], p.Kind.STATE_SET)
            if int(header[p.R_STATUS]) != p.Status.OK:
                raise p.ParameterServerError(f"shard {shard} rejected the checkpoint state")
            self.versions[shard] = int(state["meta"]["version"])

    def finish(self, flat_params: torch.Tensor) -> list[torch.Tensor]:
        """Tell every shard this worker is done; receive its final parameters and statistics.

        Each shard replies once every worker still alive is done, so the call
        returns the same parameters on every worker. Returns each shard's
        statistics vector (see ``protocol.STATS_FIELDS``).
        """
        stats = [torch.empty(p.STATS_FIELDS, dtype=torch.float64) for _ in self.servers]
        stats_requests = [self.comm.irecv(vector, source=server, tag=p.TAG_REPLY_STATS)
                          for vector, server in zip(stats, self.servers)]
        replies = self.request(p.Kind.DONE, receive=flat_params)
        self._wait(stats_requests, p.Kind.DONE)
        self.versions = [int(reply[p.R_VERSION]) for reply in replies]
        return stats

    def done(self) -> list[torch.Tensor]:
        """Finish without keeping the final parameters; return each shard's statistics."""
        return self.finish(torch.empty(self.bounds[-1][1], dtype=p.PAYLOAD_DTYPE))

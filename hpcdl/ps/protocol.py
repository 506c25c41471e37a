"""The wire format between parameter-server shards and workers, and its validation.

Every request is a fixed-size float64 header (``HEADER_FIELDS``) on ``TAG_REQUEST``,
followed for requests that carry tensor data by one float32 payload on
``TAG_REQUEST_DATA``. Every request gets a reply header on ``TAG_REPLY``, and
replies that carry tensor data send one payload on ``TAG_REPLY_DATA``. The reply
to DONE also sends the shard's statistics vector on ``TAG_REPLY_STATS``. Headers and
payloads travel through MPI buffer methods; nothing on the tensor path is pickled.
Integer fields travel as float64, which represents every integer up to 2**53 exactly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from enum import IntEnum

import torch

from hpcdl.comm.ring import chunk_bounds

TAG_REQUEST = 7101
TAG_REQUEST_DATA = 7102
TAG_REPLY = 7103
TAG_REPLY_DATA = 7104
TAG_CONTROL = 7105
TAG_REPLY_STATS = 7106

# Header fields, by index.
KIND, SHARD, DTYPE, NUMEL, NBYTES, VERSION, WORKER, CLOCK, LR = range(9)
HEADER_FIELDS = 9
HEADER_BYTES = HEADER_FIELDS * 8

# Reply header fields, by index.
R_STATUS, R_VERSION, R_NUMEL, R_CLOCK = range(4)
REPLY_FIELDS = 4

# Staleness and clock-gap histograms have this many bins; the last one counts
# every value at or above it.
HISTOGRAM_BINS = 256

# A shard's statistics vector (float64): these scalars, then the staleness
# histogram, then the clock-gap histogram.
S_PUSHES, S_ELAPSED_S, S_REJECTED, S_VERSION, S_BYTES_RECEIVED, S_LOST_WORKERS = range(6)
STATS_SCALARS = 6
STATS_FIELDS = STATS_SCALARS + 2 * HISTOGRAM_BINS

# The one parameter dtype the server stores; the code travels in the DTYPE field.
DTYPE_CODES = {torch.float32: 1}
PAYLOAD_DTYPE = torch.float32
# DTYPE code of a compressed push: the compressor's payload tensors packed into
# bytes (``hpcdl.compression.pack``). The shard computes the expected length
# from its compressor and its tensor shapes.
ENCODED_CODE = 2


class Kind(IntEnum):
    """Request kinds a worker sends to a shard."""

    INIT = 1        # worker 0 sends the initial shard parameters
    PUSH_PULL = 2   # apply a gradient, reply with fresh parameters
    PULL = 3        # reply with the current parameters
    STATS = 4       # reply with pushes, elapsed time and histograms (float64 payload)
    STATE_GET = 5   # reply with parameters and optimizer state for a checkpoint
    STATE_SET = 6   # restore parameters and optimizer state from a checkpoint
    DONE = 7        # this worker is done; reply with the final parameters and statistics
                    # once every worker still alive is done too


class Status(IntEnum):
    """Reply status codes; every value but OK rejects the request."""

    OK = 0
    BAD_HEADER = 1
    BAD_KIND = 2
    BAD_SHARD = 3
    BAD_DTYPE = 4
    BAD_SHAPE = 5
    BAD_LENGTH = 6
    BAD_VERSION = 7
    BAD_WORKER = 8
    BAD_CLOCK = 9
    NOT_INITIALIZED = 10
    BAD_LR = 11
    ALREADY_INITIALIZED = 12
    LOST_WORKER = 13


STATUS_MESSAGES = {
    Status.BAD_HEADER: "header has the wrong size or a non-integer field",
    Status.BAD_KIND: "unknown request kind",
    Status.BAD_SHARD: "request sent to the wrong shard",
    Status.BAD_DTYPE: "payload dtype is not the one the shard expects (float32, or packed compressor bytes)",
    Status.BAD_SHAPE: "element count does not match the shard",
    Status.BAD_LENGTH: "payload byte length does not match the header",
    Status.BAD_VERSION: "version is negative or ahead of the shard",
    Status.BAD_WORKER: "worker rank in the header is not the sender, or the sender is not a worker",
    Status.BAD_CLOCK: "clock is not the sender's next push",
    Status.NOT_INITIALIZED: "shard has not received its initial parameters",
    Status.BAD_LR: "learning rate is not a finite non-negative number",
    Status.ALREADY_INITIALIZED: "shard already has its initial parameters",
    Status.LOST_WORKER: ("the shards counted this worker as lost after ps_timeout_s seconds of silence and go on "
                         "without it; raise --ps-timeout-s above the longest pause between its pushes"),
}

# Kinds whose request carries a float32 payload of the shard's size.
KINDS_WITH_PAYLOAD = {Kind.INIT, Kind.PUSH_PULL}


# How long a polling loop sleeps per poll once it has spun for _SPIN_S, in seconds.
_IDLE_SLEEP_S = 0.0002
_SPIN_S = 0.002


def pause(since: float) -> None:
    """Pace a polling loop that has waited since ``since``: yield the core at first, then sleep.

    MPICH moves a large message only while both ranks are inside MPI calls, so
    a rank polls without sleeping for the first ``_SPIN_S``. ``sched_yield``
    hands the core to another rank of an oversubscribed node. A longer wait
    sleeps between polls, so an idle rank costs little CPU.
    """
    if time.monotonic() - since < _SPIN_S:
        os.sched_yield()
    else:
        time.sleep(_IDLE_SLEEP_S)


class ParameterServerError(RuntimeError):
    """A shard rejected a request, or did not reply in time."""


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """Split ``numel`` float32 elements into ``shards`` contiguous ranges of near-equal bytes.

    The ranges cut through tensors, so one large tensor may span several shards.
    Earlier shards get the one extra element when the split is uneven.

    Example:
        >>> shard_bounds(10, 3)
        [(0, 4), (4, 7), (7, 10)]
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return chunk_bounds(numel, shards)


def shard_shapes(shapes: list[tuple[int, ...]], bounds: list[tuple[int, int]]) -> list[list[tuple[int, ...]]]:
    """Return, for each shard range, the shapes of the tensors it holds.

    A tensor that lies wholly inside a range keeps its shape; a piece of a
    tensor cut by a range boundary becomes a 1-D shape. A compressor that
    treats matrices apart (PowerSGD) reads these shapes.

    Example:
        >>> shard_shapes([(2, 3), (4,)], [(0, 5), (5, 10)])
        [[(5,)], [(1,), (4,)]]
    """
    out: list[list[tuple[int, ...]]] = []
    for start, end in bounds:
        pieces, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            low, high = max(start, offset), min(end, offset + size)
            if low < high:
                pieces.append(tuple(shape) if (low, high) == (offset, offset + size) else (high - low,))
            offset += size
        out.append(pieces)
    return out


@dataclass
class ShardView:
    """The shard state that request validation reads."""

    shard: int
    numel: int | None          # None until INIT
    version: int
    worker_ranks: frozenset[int]
    init_rank: int
    next_clock: dict[int, int]
    done: frozenset[int] = frozenset()
    lost: frozenset[int] = frozenset()
    push_nbytes: int | None = None   # a compressed push's byte length; None when pushes are float32


def _is_integer(value: float) -> bool:
    return math.isfinite(value) and value == int(value)


def request_kind(header: list[float]) -> Kind | None:
    """Return the request kind a header names, or None when its size or KIND field is invalid."""
    if len(header) != HEADER_FIELDS or not _is_integer(header[KIND]):
        return None
    value = int(header[KIND])
    return Kind(value) if value in Kind._value2member_map_ else None


def validate_request(header: list[float], source: int, payload_nbytes: int | None,
                     view: ShardView) -> Status:
    """Check one request against the shard's state; return ``Status.OK`` or the reason to reject it.

    Args:
        header: the received header values (any length; the right one is checked).
        source: the MPI rank the header came from.
        payload_nbytes: the byte length of the payload that followed, or None
            when the request kind carries none.
        view: the shard's current state.
    """
    if len(header) != HEADER_FIELDS:
        return Status.BAD_HEADER
    if not all(_is_integer(header[i]) for i in (KIND, SHARD, DTYPE, NUMEL, NBYTES, VERSION, WORKER, CLOCK)):
        return Status.BAD_HEADER
    kind_value = int(header[KIND])
    if kind_value not in Kind._value2member_map_:
        return Status.BAD_KIND
    kind = Kind(kind_value)
    worker = int(header[WORKER])
    if source in view.lost:
        return Status.LOST_WORKER
    if worker != source or source not in view.worker_ranks or source in view.done:
        return Status.BAD_WORKER
    if kind in (Kind.INIT, Kind.STATE_SET) and source != view.init_rank:
        return Status.BAD_WORKER
    if int(header[SHARD]) != view.shard:
        return Status.BAD_SHARD
    if kind != Kind.INIT and view.numel is None:
        return Status.NOT_INITIALIZED
    if kind == Kind.INIT and view.numel is not None:
        return Status.ALREADY_INITIALIZED
    if kind not in KINDS_WITH_PAYLOAD:
        return Status.OK

    encoded = kind == Kind.PUSH_PULL and view.push_nbytes is not None
    if int(header[DTYPE]) != (ENCODED_CODE if encoded else DTYPE_CODES[PAYLOAD_DTYPE]):
        return Status.BAD_DTYPE
    numel = int(header[NUMEL])
    if numel < 0 or (view.numel is not None and numel != view.numel):
        return Status.BAD_SHAPE
    expected_nbytes = view.push_nbytes if encoded else numel * (torch.finfo(PAYLOAD_DTYPE).bits // 8)
    if int(header[NBYTES]) != expected_nbytes or payload_nbytes != expected_nbytes:
        return Status.BAD_LENGTH
    if kind == Kind.PUSH_PULL:
        version = int(header[VERSION])
        if version < 0 or version > view.version:
            return Status.BAD_VERSION
        if int(header[CLOCK]) != view.next_clock.get(source, -1):
            return Status.BAD_CLOCK
        if not (math.isfinite(header[LR]) and header[LR] >= 0):
            return Status.BAD_LR
    return Status.OK


def make_header(kind: Kind, shard: int, worker: int, *, numel: int = 0, version: int = 0,
                clock: int = 0, lr: float = 0.0, encoded_nbytes: int | None = None) -> torch.Tensor:
    """Build a request header as a float64 tensor.

    Args:
        encoded_nbytes: the byte length of a compressed payload that carries
            ``numel`` elements; None for a float32 payload.
    """
    header = torch.zeros(HEADER_FIELDS, dtype=torch.float64)
    header[KIND] = int(kind)
    header[SHARD] = shard
    header[NUMEL] = numel
    if encoded_nbytes is None:
        header[DTYPE] = DTYPE_CODES[PAYLOAD_DTYPE]
        header[NBYTES] = numel * (torch.finfo(PAYLOAD_DTYPE).bits // 8)
    else:
        header[DTYPE] = ENCODED_CODE
        header[NBYTES] = encoded_nbytes
    header[VERSION] = version
    header[WORKER] = worker
    header[CLOCK] = clock
    header[LR] = lr
    return header


def histogram_stats(counts: torch.Tensor) -> dict[str, float]:
    """Return mean, p50, p99 and max of integer samples given as a histogram of counts per value.

    The last bin counts values of ``HISTOGRAM_BINS - 1`` and more, so statistics
    above it are lower bounds.
    """
    total = float(counts.sum())
    if total == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    values = torch.arange(len(counts), dtype=torch.float64)
    cumulative = torch.cumsum(counts.to(torch.float64), 0)
    nonzero = torch.nonzero(counts).reshape(-1)

    def percentile(q: float) -> float:
        return float(torch.searchsorted(cumulative, torch.tensor(q * total, dtype=torch.float64)))

    return {"mean": float((values * counts).sum() / total), "p50": percentile(0.5),
            "p99": percentile(0.99), "max": float(nonzero[-1])}

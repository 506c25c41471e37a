"""The interface between strategies and compressors."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from hpcdl.comm import Communicator
from hpcdl.compression.error_feedback import ErrorFeedback

log = logging.getLogger(__name__)

# The shape of every tensor packed into a flat buffer, in order; None when the
# caller has only the flat buffer.
Shapes = Sequence[torch.Size] | None


class Compressor:
    """Sum a flat tensor across ranks, in whatever encoding the compressor uses.

    Strategies hand every tensor they combine across ranks (a gradient bucket, a
    parameter delta, a pseudo-gradient) to ``allreduce``, with a ``key`` that is
    stable from step to step so that error-feedback residuals and warm starts
    can be kept per tensor. The result must be the same on every rank.

    Strategies that send one rank's tensor to another rank instead of summing
    (a parameter-server push) call ``encode`` on the sender, send the payload
    tensors, and call ``decode`` on the receiver::

        payload = compressor.encode("push/bucket0", flat)   # on the worker
        for tensor in payload:
            comm.send(tensor, dest=server)
        # on the server, with the same compressor spec and buffers shaped by
        # compressor.payload_layout(numel):
        update = compressor.decode("push/bucket0", payload, numel)

    ``encode`` applies error feedback on the sender. ``decode`` needs no state
    of the sender except what travels in the payload, so one server can decode
    pushes from any number of workers.

    Attributes:
        name: the spec name.
        biased: the encoding's expectation differs from its input, so error
            feedback is on unless the spec says ``ef=false``.
        combine: ``allreduce`` when encodings can be summed element-wise on the
            wire (casts, random-k with shared indices, low-rank factors),
            ``allgather`` when every rank must receive every other rank's
            encoding and sum the decoded tensors (top-k, QSGD, sign).
    """

    name = "none"
    biased = False
    combine = "allreduce"

    def __init__(self, *, ef: bool | None = None) -> None:
        use_feedback = self.biased if ef is None else ef
        self.feedback: ErrorFeedback | None = ErrorFeedback() if use_feedback else None
        # The last averaged value of each tensor given to ``allreduce_delta``, the same on every rank.
        self.anchors: dict[str, torch.Tensor] = {}

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        """Replace ``flat`` in place with the (approximate) sum over ranks of ``flat``.

        Args:
            key: a name for the tensor, the same on every rank and every step.
            flat: a contiguous 1-D tensor, the same length on every rank.
            comm: the communicator to sum over; every rank of it must call this.
            algorithm: the all-reduce algorithm for encodings summed on the wire.
            shapes: the shapes of the tensors packed into ``flat``, in order.
                Only PowerSGD uses them, to find the matrices.
        """
        comm.allreduce(flat, algorithm=algorithm)

    def allreduce_delta(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                        algorithm: str = "auto", shapes: Shapes = None) -> None:
        """Sum model tensors across ranks by compressing their change since the last call.

        Averaging strategies (local SGD, hierarchical) call this on parameters,
        where compressing the values themselves would destroy them (top-k of a
        weight matrix zeroes most weights). Each rank compresses
        ``flat - anchor``, where the anchor is the mean returned by the previous
        call for ``key`` and is the same on every rank. The result is
        ``size * anchor + sum of compressed deltas``. The first call for a key
        has no anchor and sums ``flat`` uncompressed. Without compression this
        is a plain all-reduce.
        """
        if self.name == "none":
            comm.allreduce(flat, algorithm=algorithm)
            return
        anchor = self.anchors.get(key)
        if anchor is None or anchor.shape != flat.shape:
            comm.allreduce(flat, algorithm=algorithm)
        else:
            delta = (flat - anchor).contiguous()
            self.allreduce(key, delta, comm, algorithm=algorithm, shapes=shapes)
            torch.add(delta, anchor, alpha=comm.size, out=flat)
        self.anchors[key] = flat / comm.size

    def encode(self, key: str, flat: torch.Tensor, *, shapes: Shapes = None) -> list[torch.Tensor]:
        """Return the payload tensors that carry ``flat``, after error feedback."""
        return [flat.detach().clone()]

    def decode(self, key: str, payload: Sequence[torch.Tensor], numel: int, *,
               shapes: Shapes = None) -> torch.Tensor:
        """Return the dense float32 tensor of ``numel`` elements that ``payload`` encodes."""
        return payload[0].to(torch.float32).reshape(-1)

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        """Return the dtype and element count of each payload tensor for an input of ``numel``."""
        return [(torch.float32, numel)]

    def encoded_nbytes(self, numel: int, *, shapes: Shapes = None) -> int:
        """Return the bytes of one rank's payload for an input of ``numel`` elements."""
        return sum(count * _itemsize(dtype) for dtype, count in self.payload_layout(numel, shapes=shapes))

    # Checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Return per-rank state (residuals, anchors, warm-start factors) for a checkpoint."""
        if self.name == "none":
            return {}
        state: dict[str, Any] = {"name": self.name,
                                 "anchors": {k: v.clone() for k, v in self.anchors.items()}}
        if self.feedback is not None:
            state["residuals"] = self.feedback.state_dict()
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; warn when the checkpoint has no compressor state."""
        if self.name == "none":
            return
        if not state:
            log.warning("the checkpoint has no state for compression %r (error-feedback residuals, "
                        "random or warm-start state); starting it from zero, so this run will not match "
                        "an uninterrupted one", self.name)
            return
        if self.feedback is not None:
            if "residuals" not in state:
                log.warning("the checkpoint has no error-feedback residuals for compression %r; "
                            "starting them from zero", self.name)
            self.feedback.load_state_dict(state.get("residuals", {}))
        self.anchors = {k: v.clone() for k, v in state.get("anchors", {}).items()}
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class GatheredCompressor(Compressor):
    """A compressor whose per-rank encodings are all-gathered and summed after decoding.

    Subclasses implement ``_encode``, ``_decode`` and ``payload_layout``. The
    payload tensors of one rank are packed into one byte buffer, so a step costs
    one all-gather of ``encoded_nbytes`` per rank.
    """

    combine = "allgather"

    def _encode(self, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _decode(self, key: str, payload: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, key: str, flat: torch.Tensor, *, shapes: Shapes = None) -> list[torch.Tensor]:
        if self.feedback is None:
            return self._encode(key, flat.detach().to(torch.float32))
        corrected = self.feedback.compensate(key, flat)
        payload = self._encode(key, corrected)
        self.feedback.update(key, corrected, self._decode(key, payload, corrected.numel()))
        return payload

    def decode(self, key: str, payload: Sequence[torch.Tensor], numel: int, *,
               shapes: Shapes = None) -> torch.Tensor:
        return self._decode(key, payload, numel)

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        numel = flat.numel()
        packed = pack(self.encode(key, flat))
        gathered = comm.allgather(packed)
        layout = self.payload_layout(numel)
        total = torch.zeros(numel, dtype=torch.float32)
        for row in gathered:
            total.add_(self._decode(key, unpack(row, layout), numel))
        flat.copy_(total)


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of any dtypes into one uint8 buffer, byte for byte."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, layout: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Split a buffer from ``pack`` back into tensors of the given dtypes and element counts."""
    out = []
    offset = 0
    for dtype, count in layout:
        nbytes = count * _itemsize(dtype)
        # clone() gives the slice its own aligned storage, which view(dtype) needs.
        out.append(buffer[offset:offset + nbytes].clone().view(dtype))
        offset += nbytes
    if offset != buffer.numel():
        raise ValueError(f"payload of {buffer.numel()} bytes does not match its layout of {offset} bytes")
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

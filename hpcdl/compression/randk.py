"""Random-k sparsification with index sets drawn from a seed every rank shares."""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch

from hpcdl.comm import Communicator
from hpcdl.compression.base import Compressor, Shapes
from hpcdl.compression.topk import kept_count


class RandKCompressor(Compressor):
    """Send k entries chosen at random, the same k on every rank.

    The indices come from a generator seeded by ``seed``, the tensor key and a
    per-key step counter, so every rank draws the same index set without
    sending it, and the k values are summed with an ordinary all-reduce.

    Without ``unbiased`` the decoded tensor keeps the chosen entries as they
    are, so its expectation is ``k/n`` times the input and error feedback is on
    by default. With ``unbiased=true`` the entries are multiplied by ``n/k``,
    which makes the expectation equal to the input, and error feedback is off
    by default.

    Args:
        ratio: the fraction of entries to send, in (0, 1].
        unbiased: scale the sent entries by ``n/k``.
        seed: the seed shared by all ranks.
        ef: keep error-feedback residuals; default: on unless ``unbiased``.
    """

    name = "randk"

    def __init__(self, ratio: float, *, unbiased: bool = False, seed: int = 0, ef: bool | None = None) -> None:
        self.biased = not unbiased
        super().__init__(ef=ef)
        if not 0 < ratio <= 1:
            raise ValueError(f"randk ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.unbiased = unbiased
        self.seed = seed
        self.draws: dict[str, int] = {}

    def _next_indices(self, key: str, numel: int) -> tuple[torch.Tensor, int]:
        draw = self.draws.get(key, 0)
        self.draws[key] = draw + 1
        return self.indices(key, draw, numel), draw

    def indices(self, key: str, draw: int, numel: int) -> torch.Tensor:
        """Return the sorted int64 indices of draw number ``draw`` for ``key``."""
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(key.encode()) * 65_537 + draw) % (2**63 - 1))
        k = kept_count(self.ratio, numel)
        return torch.randperm(numel, generator=generator)[:k].sort().values

    def _scale(self, numel: int) -> float:
        return numel / kept_count(self.ratio, numel) if self.unbiased else 1.0

    def _select(self, key: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        numel = flat.numel()
        indices, draw = self._next_indices(key, numel)
        if self.feedback is None:
            return flat.detach().to(torch.float32)[indices].contiguous(), indices, draw
        corrected = self.feedback.compensate(key, flat)
        values = corrected[indices].contiguous()
        sent = torch.zeros_like(corrected)
        sent[indices] = values * self._scale(numel)
        self.feedback.update(key, corrected, sent)
        return values, indices, draw

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        values, indices, _ = self._select(key, flat)
        comm.allreduce(values, algorithm=algorithm)
        flat.zero_()
        flat[indices] = (values * self._scale(flat.numel())).to(flat.dtype)

    def encode(self, key: str, flat: torch.Tensor, *, shapes: Shapes = None) -> list[torch.Tensor]:
        values, _, draw = self._select(key, flat)
        return [values, torch.tensor([draw], dtype=torch.int64)]

    def decode(self, key: str, payload: Sequence[torch.Tensor], numel: int, *,
               shapes: Shapes = None) -> torch.Tensor:
        values, draw = payload
        out = torch.zeros(numel, dtype=torch.float32)
        out[self.indices(key, int(draw[0]), numel)] = values.to(torch.float32) * self._scale(numel)
        return out

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, kept_count(self.ratio, numel)), (torch.int64, 1)]

    def _extra_state(self) -> dict[str, Any]:
        return {"draws": dict(self.draws)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.draws = {key: int(value) for key, value in state.get("draws", {}).items()}

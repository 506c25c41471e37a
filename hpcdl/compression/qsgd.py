"""QSGD: unbiased stochastic quantization to a few levels per bucket norm."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hpcdl.comm import Communicator
from hpcdl.compression.base import GatheredCompressor, Shapes


def level_dtype(levels: int) -> torch.dtype:
    """Return the smallest signed integer type that fits ``-levels .. levels``."""
    if levels <= 127:
        return torch.int8
    if levels <= 32767:
        return torch.int16
    return torch.int32


class QSGDCompressor(GatheredCompressor):
    """Quantize each entry to ``norm * sign * l / levels`` with l in ``0..levels``.

    The level l is rounded up or down at random with the probabilities that make
    the expectation equal to the input (Alistarh et al., "QSGD:
    Communication-Efficient SGD via Gradient Quantization and Encoding",
    NeurIPS 2017). A rank sends one float32 L2 norm per tensor and one signed
    integer per entry, in the smallest type that fits the levels (int8 up to
    127 levels). QSGD is unbiased, so error feedback is off unless ``ef=true``.

    Random draws come from a per-rank generator seeded with ``seed`` and the
    rank; its state is part of the checkpoint.

    Args:
        levels: quantization levels per sign, at least 1.
        seed: seed of the rounding draws.
        ef: keep error-feedback residuals; off by default.
    """

    name = "qsgd"

    def __init__(self, levels: int, *, seed: int = 0, ef: bool | None = None) -> None:
        super().__init__(ef=ef)
        if levels < 1:
            raise ValueError(f"qsgd levels must be at least 1, got {levels}")
        self.levels = levels
        self.dtype = level_dtype(levels)
        self.seed = seed
        self.generator: torch.Generator | None = None

    def seed_rank(self, rank: int) -> None:
        """Seed the rounding draws for ``rank``, unless a checkpoint already restored them."""
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)

    def _encode(self, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.generator is None:
            self.seed_rank(0)
        norm = torch.linalg.vector_norm(tensor).reshape(1)
        if norm.item() == 0.0:
            return [norm, torch.zeros(tensor.numel(), dtype=self.dtype)]
        scaled = tensor.abs() / norm * self.levels
        lower = scaled.floor()
        draws = torch.rand(tensor.numel(), generator=self.generator)
        level = lower + (draws < scaled - lower).to(torch.float32)
        return [norm, (level * tensor.sign()).to(self.dtype)]

    def _decode(self, key: str, payload: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        norm, levels = payload
        return levels.to(torch.float32) * (norm.to(torch.float32) / self.levels)

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (self.dtype, numel)]

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        self.seed_rank(comm.rank)
        super().allreduce(key, flat, comm, algorithm=algorithm, shapes=shapes)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])

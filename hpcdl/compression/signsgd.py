"""Scaled sign compression: one bit per entry plus one scale per tensor."""

from __future__ import annotations

from typing import Sequence

import torch

from hpcdl.compression.base import GatheredCompressor, Shapes

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 per byte, most significant bit first."""
    padded = torch.zeros(-(-bits.numel() // 8) * 8, dtype=torch.uint8)
    padded[:bits.numel()] = bits.reshape(-1)
    return (padded.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Return the first ``numel`` bits of ``pack_bits`` output as a bool tensor."""
    return ((packed.reshape(-1, 1) >> _SHIFTS) & 1).reshape(-1)[:numel].bool()


class SignSGDCompressor(GatheredCompressor):
    """Send ``scale * sign(x)`` with ``scale = mean(|x|)``, as in EF-SignSGD.

    A rank sends ceil(n/8) bytes of sign bits and one float32 scale per tensor
    (Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019). Zero counts as positive. Signs are biased,
    so error feedback is on unless ``ef=false``.

    Args:
        ef: keep error-feedback residuals; on by default.
    """

    name = "signsgd"
    biased = True

    def _encode(self, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        scale = tensor.abs().mean().reshape(1)
        return [scale, pack_bits(tensor >= 0)]

    def _decode(self, key: str, payload: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        scale, packed = payload
        signs = unpack_bits(packed, numel).to(torch.float32) * 2 - 1
        return signs * scale.to(torch.float32)

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        return [(torch.float32, 1), (torch.uint8, -(-numel // 8))]

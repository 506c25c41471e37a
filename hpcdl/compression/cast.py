"""fp16 and bf16: cast each tensor to 16 bits for the transfer."""

from __future__ import annotations

from typing import Sequence

import torch

from hpcdl.comm import Communicator
from hpcdl.compression.base import Compressor, Shapes


class CastCompressor(Compressor):
    """Send tensors as float16 or bfloat16, halving the bytes of an all-reduce.

    Each rank divides its tensor by the rank count before the cast and the sum,
    and the sum is multiplied back in float32. So a value that fits in the
    16-bit type on one rank cannot overflow in the sum: 30000 on each of 4 ranks
    sums to 120000, above float16's maximum of 65504, but each rank sends 7500.
    Rounding to 16 bits is biased, so error feedback keeps the rounding error of
    this rank's cast (not the rounding inside the sum) unless ``ef=false``.

    Args:
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        ef: keep error-feedback residuals; on by default.
    """

    biased = True

    def __init__(self, dtype: torch.dtype, *, ef: bool | None = None) -> None:
        super().__init__(ef=ef)
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CastCompressor needs float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def _cast(self, key: str, flat: torch.Tensor, scale: float) -> torch.Tensor:
        if self.feedback is None:
            return (flat.detach().to(torch.float32) / scale).to(self.dtype)
        corrected = self.feedback.compensate(key, flat)
        low = (corrected / scale).to(self.dtype)
        self.feedback.update(key, corrected, low.to(torch.float32) * scale)
        return low

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        low = self._cast(key, flat, float(comm.size))
        comm.allreduce(low, algorithm=algorithm)
        flat.copy_(low.to(torch.float32) * comm.size)

    def encode(self, key: str, flat: torch.Tensor, *, shapes: Shapes = None) -> list[torch.Tensor]:
        return [self._cast(key, flat, 1.0)]

    def decode(self, key: str, payload: Sequence[torch.Tensor], numel: int, *,
               shapes: Shapes = None) -> torch.Tensor:
        return payload[0].to(torch.float32).reshape(-1)

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        return [(self.dtype, numel)]

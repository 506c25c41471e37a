"""Error feedback: carry what a biased compressor dropped into the next step."""

from __future__ import annotations

from typing import Any

import torch


class ErrorFeedback:
    """Per-rank residuals of a biased compressor, one per tensor key.

    Before compressing, the compressor adds the residual left over from the last
    step to its input (``compensate``). After compressing, it stores what the
    encoding dropped (``update``). Over any number of steps the sum of what a
    rank sent plus its current residual equals the sum of its inputs, which is
    what makes top-k, sign and low-rank compression converge (Karimireddy et
    al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
    ICML 2019).

    Residuals are float32 tensors of the input's shape. They belong to this rank
    only and are part of every checkpoint through ``state_dict``.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return a new float32 tensor: ``tensor`` plus the residual stored for ``key``."""
        corrected = tensor.detach().to(torch.float32, copy=True)
        residual = self.residuals.get(key)
        if residual is not None:
            if residual.shape != corrected.shape:
                raise ValueError(f"error-feedback residual for {key!r} has shape {tuple(residual.shape)}, "
                                 f"but the tensor has shape {tuple(corrected.shape)}")
            corrected.add_(residual)
        return corrected

    def update(self, key: str, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        """Store ``corrected - sent`` as the residual for ``key``."""
        residual = self.residuals.get(key)
        if residual is None or residual.shape != corrected.shape:
            residual = torch.empty_like(corrected, dtype=torch.float32)
            self.residuals[key] = residual
        torch.sub(corrected, sent.to(torch.float32), out=residual)

    def state_dict(self) -> dict[str, Any]:
        return {key: residual.clone() for key, residual in self.residuals.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {key: value.to(torch.float32).clone() for key, value in state.items()}

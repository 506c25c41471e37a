"""Gradient transforms applied between the reduction and the optimizer step."""

from __future__ import annotations

import logging
from typing import Any

import torch

from hpcdl.strategies.base import Strategy

log = logging.getLogger(__name__)


class GradientTransforms:
    """Clip the reduced gradient once per optimizer step.

    With a synchronous strategy the gradient in ``.grad`` is already averaged and
    identical on every rank, so the global L2 norm and the clipping factor are the
    same everywhere without further communication.

    Args:
        strategy: the strategy whose gradients are transformed.
        clip_norm: the maximum global L2 norm, or None for no clipping.
    """

    def __init__(self, strategy: Strategy, *, clip_norm: float | None = None) -> None:
        self.strategy = strategy
        self.clip_norm = clip_norm
        self.last_grad_norm: float | None = None

    def _params(self) -> list[torch.nn.Parameter]:
        assert self.strategy.model is not None
        return [p for p in self.strategy.model.parameters() if p.grad is not None]

    def apply(self) -> bool:
        """Transform gradients in place; return False when the step must be skipped."""
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params(), self.clip_norm)
            self.last_grad_norm = float(norm)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

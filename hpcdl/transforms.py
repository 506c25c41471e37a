"""Gradient transforms applied between the reduction and the optimizer step.

The order within one optimizer step is fixed, for every strategy:

1. The trainer runs each micro-batch's backward on the loss multiplied by
   the current loss scale (fp16 only) and by the micro-batch's share of the
   rank's samples. ``no_sync`` keeps all but the last micro-batch local.
2. ``check_local_gradients`` records whether this rank's own gradient is
   finite, before the strategy combines it with other ranks'.
3. The strategy reduces gradients (``allreduce``, ``hierarchical``, warmup
   steps of ``local-sgd``) or leaves them local (``local-sgd``, ``diloco``).
4. ``apply`` unscales the gradient by the scale used in this step's backward.
   One small all-reduce then tells every rank whether any rank saw an inf or
   NaN. If one did, every rank skips the step. Otherwise the gradient is
   clipped once to ``clip_norm``.
5. The local optimizer steps, then the strategy's ``after_step`` runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hpcdl.strategies.base import Strategy

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


class NonFiniteGradientError(RuntimeError):
    """Raised on every rank when too many consecutive steps had a non-finite gradient."""


class LossScaler:
    """Dynamic loss scaling for fp16 with the update rule of ``torch.amp.GradScaler``.

    The defaults are GradScaler's (torch 2.x): start at 2**16, halve the scale
    after a step with an inf or NaN, and double it after ``growth_interval``
    consecutive finite steps. Unlike GradScaler, the caller passes the overflow
    decision in, so that every rank can use the same, agreed decision.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0

    def update(self, found_nonfinite: bool) -> None:
        """Shrink the scale after an overflow, or grow it after enough finite steps."""
        if found_nonfinite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state.get("scale", self.scale))
        self.growth_tracker = int(state.get("growth_tracker", 0))


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


class GradientTransforms:
    """Unscale, guard against non-finite values, and clip the gradient once per optimizer step.

    The non-finite guard runs at every precision. When any rank's gradient
    contains an inf or NaN, either before or after the reduction, every rank
    skips the optimizer step, the fp16 loss scale shrinks identically on every
    rank, and rank 0 logs the step and the lowest rank with a non-finite
    gradient. After ``max_skipped_steps`` consecutive skipped steps every rank
    raises ``NonFiniteGradientError``, which names that rank.

    Clipping acts on the gradient in ``.grad`` after the reduction and after
    unscaling. With ``allreduce`` and ``hierarchical`` that gradient is the
    average, identical on the ranks that averaged it, so every one of them
    computes the same norm and the same factor. With ``local-sgd`` and
    ``diloco`` it is the rank's own gradient, clipped by its own norm.

    Args:
        strategy: the strategy whose gradients are transformed.
        clip_norm: the maximum global L2 norm, or None for no clipping.
        precision: ``fp32``, ``bf16`` or ``fp16``; only fp16 scales the loss.
        max_skipped_steps: consecutive skipped steps before the job fails;
            0 never fails.
    """

    def __init__(self, strategy: Strategy, *, clip_norm: float | None = None, precision: str = "fp32",
                 max_skipped_steps: int = 20) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.strategy = strategy
        self.clip_norm = clip_norm
        self.precision = precision
        self.max_skipped_steps = max_skipped_steps
        self.scaler = LossScaler() if precision == "fp16" else None
        self.last_grad_norm: float | None = None
        self.consecutive_skips = 0
        self._backward_scale: float | None = None
        self._local_nonfinite = False

    @property
    def loss_scale(self) -> float:
        """The factor ``scale_loss`` multiplies by now: the fp16 loss scale, or 1."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss`` multiplied by the loss scale; call ``backward()`` on the result."""
        if self.scaler is None:
            return loss
        self._backward_scale = self.scaler.scale
        return loss * self.scaler.scale

    def _params(self) -> list[torch.nn.Parameter]:
        assert self.strategy.model is not None
        return [p for p in self.strategy.model.parameters() if p.grad is not None]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params()]

    def check_local_gradients(self) -> None:
        """Record whether this rank's own gradient is finite; call after backward, before the reduction."""
        self._local_nonfinite = not bool(torch.isfinite(_total_norm(self._grads())))

    def apply(self) -> bool:
        """Transform gradients in place; return False when every rank must skip the step."""
        grads = self._grads()
        scale = self._backward_scale if self._backward_scale is not None else 1.0
        self._backward_scale = None
        if scale != 1.0:
            for grad in grads:
                grad.mul_(1.0 / scale)

        norm = _total_norm(grads)
        found_here = self._local_nonfinite or not bool(torch.isfinite(norm))
        self._local_nonfinite = False
        comm = self.strategy.comm
        # Maximum over ranks of [flag, -rank]: any rank's flag, and the lowest flagged rank.
        found, negative_rank = comm.allreduce_scalars(
            [1.0 if found_here else 0.0, -float(comm.rank) if found_here else -float(comm.size)], op="max")
        found_anywhere = found > 0
        if self.scaler is not None:
            self.scaler.update(found_anywhere)

        if found_anywhere:
            self._skip(int(-negative_rank), found_here)
            return False
        self.consecutive_skips = 0
        self.last_grad_norm = float(norm)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self._params(), self.clip_norm, norm)
        return True

    def _skip(self, bad_rank: int, found_here: bool) -> None:
        step = self.strategy.steps + self.strategy.skipped_steps
        self.consecutive_skips += 1
        if found_here:
            log.warning("non-finite gradient on this rank at step %d", step)
        if self.strategy.comm.rank == 0:
            log.warning("step %d skipped on every rank: non-finite gradient on rank %d "
                        "(%d consecutive skipped steps%s)", step, bad_rank, self.consecutive_skips,
                        f", loss scale now {self.scaler.scale:g}" if self.scaler is not None else "")
        if self.max_skipped_steps and self.consecutive_skips >= self.max_skipped_steps:
            raise NonFiniteGradientError(
                f"{self.consecutive_skips} consecutive optimizer steps skipped because of non-finite gradients; "
                f"the last one, step {step}, had a non-finite gradient on rank {bad_rank}. Lower the learning "
                f"rate, enable --clip-norm, or check the data on that rank's shard.")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"consecutive_skips": self.consecutive_skips}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

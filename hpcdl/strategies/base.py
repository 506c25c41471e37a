"""The interface every synchronization strategy exposes to the optimizer wrapper."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor, build_compressor
from hpcdl.specs import Spec


class Strategy:
    """Keep model replicas in step across ranks.

    A strategy owns its whole algorithm: what it sends, when, and how it applies
    what it receives. The optimizer wrapper calls, in this order per run:
    ``attach`` once, then per optimizer step ``begin_step`` (optional),
    the user's backward passes (inside ``no_sync`` for all but the last
    micro-batch), and ``step``; ``finish`` once at the end.

    Subclasses set ``name`` and override what they need.

    A strategy whose ranks must never wait for each other sets
    ``independent_workers``: the trainer then runs no collective between them
    after set-up, and ends the run when ``progress_steps`` reaches its length.
    """

    name = "base"
    independent_workers = False

    def __init__(self, comm: Communicator, *, compressor: Compressor | None = None) -> None:
        self.comm = comm
        self.compressor = compressor if compressor is not None else Compressor()
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.skipped_steps = 0
        self.grad_transform: Callable[[], bool] | None = None
        self._sync_enabled = True

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> Strategy:
        """Build from a parsed spec plus run-wide options; unknown options are ignored."""
        return cls(comm, compressor=build_compressor(options.get("compression")), **spec.params)

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the model and its local optimizer; start every rank from rank 0's state."""
        self.model = model
        self.optimizer = optimizer
        self.broadcast_state(root=0)

    def begin_step(self, local_samples: int, global_samples: int | None = None) -> None:
        """Declare how many samples this rank contributes to the coming step."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally without communicating, for all but the last micro-batch."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def step(self, closure=None) -> Any:
        """Synchronize as the strategy prescribes and apply one optimizer step.

        The order is fixed: ``reduce_gradients``, then ``grad_transform`` (clipping,
        unscaling, the non-finite guard), then the local optimizer's step, then
        ``after_step``. When ``grad_transform`` returns False every rank skips the
        optimizer step together.
        """
        assert self.optimizer is not None, "attach() must run first"
        self.reduce_gradients()
        if self.grad_transform is not None and not self.grad_transform():
            self.skipped_steps += 1
            return None
        result = self.optimizer.step(closure)
        self.steps += 1
        self.after_step()
        return result

    def reduce_gradients(self) -> None:
        """Combine gradients across ranks before the optimizer step; local strategies do nothing."""

    def after_step(self) -> None:
        """Run after each applied optimizer step, for example to average parameters."""

    def close(self) -> None:
        """Release hooks and threads."""

    def finish(self) -> None:
        """Make every rank hold bit-identical parameters and buffers."""
        self.broadcast_state(root=0)

    def broadcast_state(self, root: int = 0) -> None:
        """Copy parameters and buffers from ``root`` to all ranks, bit for bit."""
        assert self.model is not None, "attach() must run first"
        for tensor in model_tensors(self.model):
            self.comm.broadcast(tensor.data, root=root)

    def progress_steps(self) -> int | None:
        """Return the whole job's progress in steps, where ranks step independently; else None."""
        return None

    def metrics(self) -> dict[str, Any]:
        """Return strategy-specific values for ``metrics.jsonl`` and ``summary.json``; may be empty."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's checkpointable state (tensors and plain values)."""
        return {"steps": self.steps, "skipped_steps": self.skipped_steps,
                "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.steps = int(state.get("steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.compressor.load_state_dict(state.get("compressor", {}))


def model_tensors(model: torch.nn.Module, *, floating_only: bool = False) -> list[torch.Tensor]:
    """Return parameters and buffers in a fixed order that is the same on every rank.

    Args:
        floating_only: leave out integer buffers such as BatchNorm's
            ``num_batches_tracked``, which averaging must not touch.
    """
    tensors = list(model.parameters())
    tensors += [b for b in model.buffers() if b.is_floating_point() or not floating_only]
    return tensors

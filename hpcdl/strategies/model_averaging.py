"""The shared base of strategies that average the whole model in rounds."""

from __future__ import annotations

from typing import Any

from hpcdl.strategies.allreduce import AllreduceStrategy
from hpcdl.strategies.averaging import average_tensors, integer_buffers
from hpcdl.strategies.base import model_tensors


class ModelAveragingStrategy(AllreduceStrategy):
    """An allreduce strategy that also averages parameters and floating-point buffers in rounds.

    Subclasses decide when a round is due and call ``average_model``. A round
    runs over ``average_comm`` with ``average_algorithm``, which default to the
    gradient communicator and algorithm. ``finish`` runs one last round if any
    step ran since the previous one, then copies integer buffers from rank 0, so
    every rank ends bit-identical.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.average_comm = self.reduce_comm
        self.average_algorithm = self.algorithm
        self.averaged_at_step = 0

    def average_model(self) -> None:
        """Replace parameters and floating-point buffers with their mean over ranks."""
        assert self.model is not None, "attach() must run first"
        average_tensors(model_tensors(self.model, floating_only=True), self.average_comm, self.compressor,
                        "model", algorithm=self.average_algorithm)
        self.averaged_at_step = self.steps

    def finish(self) -> None:
        """Average once more if any step ran since the last round, then copy integer buffers from rank 0."""
        assert self.model is not None, "attach() must run first"
        if self.steps != self.averaged_at_step:
            self.average_model()
        for buffer in integer_buffers(self.model):
            self.comm.broadcast(buffer.data, root=0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "averaged_at_step": self.averaged_at_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.averaged_at_step = int(state.get("averaged_at_step", self.steps))

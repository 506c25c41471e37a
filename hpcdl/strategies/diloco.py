"""DiLoCo: H inner steps per rank, then an outer Nesterov step on the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor, build_compressor
from hpcdl.specs import Spec
from hpcdl.strategies.averaging import average_tensors, flatten, integer_buffers, unflatten_into
from hpcdl.strategies.base import Strategy


class DiLoCoStrategy(Strategy):
    """Run rounds of ``period`` inner steps and one outer optimizer step.

    Each rank trains alone with the wrapped (inner) optimizer, which is AdamW in
    DiLoCo as published (Douillard et al., 2023, arXiv:2311.08105). At the end of a round the ranks average the pseudo-gradient
    ``start - current``, where ``start`` is the parameters at the start of the
    round, in one flat all-reduce through the compressor. An outer SGD optimizer
    with Nesterov momentum then steps from ``start`` along that gradient, and
    every rank copies the result into its model. Floating-point buffers are
    averaged in the same round.

    With ``outer_lr=1`` and ``outer_momentum=0`` the outer step lands on the mean
    of the ranks' parameters, so the strategy equals ``local-sgd`` with the same
    period. The outer parameters and the outer optimizer's momentum are part of
    ``state_dict``, so a checkpoint taken mid-round resumes the round exactly.
    Gradient clipping acts on each rank's own inner gradient.

    Args:
        comm: the data-parallel communicator.
        period: inner optimizer steps per round (H).
        outer_lr: learning rate of the outer SGD step.
        outer_momentum: Nesterov momentum of the outer step; 0 turns momentum off.
        algorithm: all-reduce algorithm for the pseudo-gradient.
        compressor: the compressor that pseudo-gradients and buffers go through.

    Example:
        >>> inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model, optimizer = hpcdl.wrap(model, inner, strategy="diloco:period=64,outer_lr=0.7")
    """

    name = "diloco"

    def __init__(self, comm: Communicator, *, period: int = 64, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, algorithm: str = "auto",
                 compressor: Compressor | None = None) -> None:
        if period < 1:
            raise ValueError(f"diloco period must be >= 1, got {period}")
        if outer_lr <= 0:
            raise ValueError(f"diloco outer_lr must be > 0, got {outer_lr}")
        if not 0 <= outer_momentum < 1:
            raise ValueError(f"diloco outer_momentum must be in [0, 1), got {outer_momentum}")
        super().__init__(comm, compressor=compressor)
        self.period = period
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.algorithm = algorithm
        self.average_comm = comm.dup()
        self.outer_params: list[torch.Tensor] = []
        self.outer_optimizer: torch.optim.SGD | None = None
        self.averaged_at_step = 0

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> DiLoCoStrategy:
        return cls(comm, period=spec.params["period"], outer_lr=spec.params["outer_lr"],
                   outer_momentum=spec.params["outer_momentum"], algorithm=options.get("algorithm", "auto"),
                   compressor=build_compressor(options.get("compression")))

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        self.outer_params = [p.detach().clone() for p in model.parameters()]
        self.outer_optimizer = torch.optim.SGD(self.outer_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                               nesterov=self.outer_momentum > 0)

    def after_step(self) -> None:
        if self.steps % self.period == 0:
            self.outer_step()

    def outer_step(self) -> None:
        """Average the pseudo-gradient, apply the outer step, and start a new round on every rank."""
        assert self.model is not None and self.outer_optimizer is not None, "attach() must run first"
        params = list(self.model.parameters())
        pseudo_grad = flatten(self.outer_params) - flatten(params)
        self.compressor.allreduce("pseudo_grad", pseudo_grad, self.average_comm, algorithm=self.algorithm,
                                  shapes=[p.shape for p in self.outer_params])
        pseudo_grad.div_(self.comm.size)

        offset = 0
        for outer in self.outer_params:
            outer.grad = pseudo_grad[offset:offset + outer.numel()].view_as(outer)
            offset += outer.numel()
        self.outer_optimizer.step()
        for outer in self.outer_params:
            outer.grad = None
        unflatten_into(flatten(self.outer_params), params)

        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if buffers:
            average_tensors(buffers, self.average_comm, self.compressor, "buffers", algorithm=self.algorithm)
        self.averaged_at_step = self.steps

    def finish(self) -> None:
        """Close a partial round with one more outer step, then copy integer buffers from rank 0."""
        assert self.model is not None, "attach() must run first"
        if self.steps != self.averaged_at_step:
            self.outer_step()
        for buffer in integer_buffers(self.model):
            self.comm.broadcast(buffer.data, root=0)

    def state_dict(self) -> dict[str, Any]:
        assert self.outer_optimizer is not None, "attach() must run first"
        return {**super().state_dict(), "averaged_at_step": self.averaged_at_step,
                "outer_params": [t.clone() for t in self.outer_params],
                "outer_optimizer": self.outer_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.outer_optimizer is not None, "attach() must run first"
        super().load_state_dict(state)
        self.averaged_at_step = int(state.get("averaged_at_step", self.steps))
        if "outer_params" in state:
            for outer, saved in zip(self.outer_params, state["outer_params"]):
                outer.copy_(saved)
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])

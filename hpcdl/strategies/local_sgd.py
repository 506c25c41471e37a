"""Local SGD: ranks step alone and average parameters and buffers every H steps."""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor, build_compressor
from hpcdl.specs import Spec
from hpcdl.strategies.model_averaging import ModelAveragingStrategy


class LocalSGDStrategy(ModelAveragingStrategy):
    """Average parameters and floating-point buffers every ``period`` optimizer steps.

    The first ``warmup`` applied optimizer steps run exactly as ``allreduce``
    (gradients averaged every step), which makes this post-local SGD. After them
    each rank steps with its own gradient, and every ``period`` steps all ranks
    replace their parameters and floating-point buffers (BatchNorm running
    statistics, for example) with the mean over ranks. The period counts applied
    optimizer steps. It does not count micro-batches of ``--accumulate``, parameter
    groups, or steps that the non-finite guard skipped. The local optimizer's state
    (momentum, Adam moments) stays on each rank and is never averaged.

    Gradient clipping acts on the gradient the optimizer is about to apply: the
    averaged gradient during warmup, this rank's own gradient afterwards.

    Args:
        comm: the data-parallel communicator.
        period: optimizer steps between two averaging rounds (H).
        warmup: synchronous steps before local stepping starts (W).
        algorithm: all-reduce algorithm for gradients and averaging rounds.
        bucket_mb: fusion bucket size in MiB for the warmup steps.
        overlap: reduce warmup gradient buckets during backward.
        compressor: the compressor every averaging round goes through.

    Example:
        >>> model, optimizer = hpcdl.wrap(model, optimizer, strategy="local-sgd:period=8,warmup=100")
    """

    name = "local-sgd"

    def __init__(self, comm: Communicator, *, period: int = 8, warmup: int = 0, algorithm: str = "auto",
                 bucket_mb: float = 25.0, overlap: bool = True, compressor: Compressor | None = None) -> None:
        if period < 1:
            raise ValueError(f"local-sgd period must be >= 1, got {period}")
        if warmup < 0:
            raise ValueError(f"local-sgd warmup must be >= 0, got {warmup}")
        super().__init__(comm, algorithm=algorithm, bucket_mb=bucket_mb, overlap=overlap, compressor=compressor)
        self.period = period
        self.warmup = warmup

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> LocalSGDStrategy:
        return cls(comm, period=spec.params["period"], warmup=spec.params["warmup"],
                   algorithm=options.get("algorithm", "auto"), bucket_mb=options.get("bucket_mb", 25.0),
                   overlap=options.get("overlap", True), compressor=build_compressor(options.get("compression")))

    @property
    def synchronous(self) -> bool:
        """True while the coming step is a warmup step that averages gradients."""
        return self.steps < self.warmup

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        assert self.buckets is not None
        self.buckets.enabled = lambda: self._sync_enabled and self.synchronous

    def begin_step(self, local_samples: int, global_samples: int | None = None) -> None:
        if self.synchronous:
            super().begin_step(local_samples, global_samples)

    def reduce_gradients(self) -> None:
        if self.synchronous:
            super().reduce_gradients()

    def after_step(self) -> None:
        local_steps = self.steps - self.warmup
        if local_steps > 0 and local_steps % self.period == 0:
            self.average_model()

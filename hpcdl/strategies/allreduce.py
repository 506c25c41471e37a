"""Synchronous data parallelism: gradients averaged every step."""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import Communicator
from hpcdl.comm.buckets import GradientBuckets
from hpcdl.compression import Compressor, build_compressor
from hpcdl.specs import Spec
from hpcdl.strategies.base import Strategy


class AllreduceStrategy(Strategy):
    """Average gradients across all ranks every optimizer step.

    Gradients are fused into buckets that are all-reduced while backward is still
    running. Each rank scales its gradients by its share of the step's samples
    before the sum. A step where ranks have different numbers of samples, such as
    the short last batch of an epoch, therefore gives exactly the single-process
    update over the global batch.

    Args:
        comm: the data-parallel communicator.
        algorithm: ``auto``, ``ring``, ``mpi``, ``hierarchical`` or ``horovod``.
        bucket_mb: target size of a fusion bucket in MiB.
        overlap: reduce buckets on a background thread during backward.
    """

    name = "allreduce"

    def __init__(self, comm: Communicator, *, algorithm: str = "auto", bucket_mb: float = 25.0,
                 overlap: bool = True, compressor: Compressor | None = None) -> None:
        super().__init__(comm, compressor=compressor)
        self.algorithm = algorithm
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)
        self.overlap = overlap
        # Reductions run on their own MPI context, so they never match a message
        # of the training loop's.
        self.reduce_comm = comm.dup()
        self.buckets: GradientBuckets | None = None

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> AllreduceStrategy:
        return cls(comm, algorithm=options.get("algorithm", "auto"),
                   bucket_mb=options.get("bucket_mb", 25.0), overlap=options.get("overlap", True),
                   compressor=build_compressor(options.get("compression")))

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = GradientBuckets(params, self.reduce_bucket, bucket_bytes=self.bucket_bytes,
                                       enabled=lambda: self._sync_enabled, overlap=self.overlap)
        self.buckets.weight = 1.0 / self.comm.size

    def reduce_bucket(self, index: int, flat: torch.Tensor) -> None:
        """Sum one bucket in place across ranks; ``flat`` is already weighted."""
        assert self.buckets is not None, "attach() must run first"
        shapes = [p.shape for p in self.buckets.buckets[index].params]
        self.compressor.allreduce(f"bucket{index}", flat, self.reduce_comm, algorithm=self.algorithm,
                                  shapes=shapes)

    def begin_step(self, local_samples: int, global_samples: int | None = None) -> None:
        if global_samples is None:
            global_samples = int(self.comm.allreduce_scalars([local_samples])[0])
        if global_samples <= 0:
            raise ValueError(f"a step needs at least one sample across ranks, got {global_samples}")
        assert self.buckets is not None, "attach() must run first"
        self.buckets.weight = local_samples / global_samples

    def reduce_gradients(self) -> None:
        """Finish every pending reduction and leave averaged gradients in ``.grad``."""
        assert self.buckets is not None, "attach() must run first"
        self.buckets.flush()
        self.buckets.weight = 1.0 / self.comm.size

    def close(self) -> None:
        if self.buckets is not None:
            self.buckets.close()

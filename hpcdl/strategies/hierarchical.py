"""Hierarchical synchronization: gradients inside each node, parameters across nodes."""

from __future__ import annotations

from typing import Any

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor, build_compressor
from hpcdl.specs import Spec
from hpcdl.strategies.model_averaging import ModelAveragingStrategy


class HierarchicalStrategy(ModelAveragingStrategy):
    """Average gradients inside each node every step, and the model across nodes every H steps.

    Nodes are the groups of ranks that ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``
    returns, or groups of ``ranks_per_node`` consecutive ranks when the
    communicator was built with that testing aid (``--ranks-per-node``). Inside a
    node the strategy is ``allreduce`` over the node's ranks, with fused buckets
    and sample-count weights, so all ranks of a node hold the same parameters.
    Every ``period`` applied optimizer steps, parameters and floating-point
    buffers are averaged over all ranks with a hierarchical all-reduce: a reduce
    inside each node, a ring all-reduce between node leaders, and a broadcast
    inside each node. Only the leaders send bytes between nodes.

    Gradient clipping acts on the node-averaged gradient, which is identical on
    the ranks of a node.

    Args:
        comm: the data-parallel communicator; its ``ranks_per_node`` defines nodes.
        period: optimizer steps between two averaging rounds across nodes.
        algorithm: all-reduce algorithm for gradients inside a node.
        bucket_mb: fusion bucket size in MiB.
        overlap: reduce gradient buckets during backward.
        compressor: the compressor that gradients and averaging rounds go through.
    """

    name = "hierarchical"

    def __init__(self, comm: Communicator, *, period: int = 8, algorithm: str = "auto", bucket_mb: float = 25.0,
                 overlap: bool = True, compressor: Compressor | None = None) -> None:
        if period < 1:
            raise ValueError(f"hierarchical period must be >= 1, got {period}")
        super().__init__(comm, algorithm=algorithm, bucket_mb=bucket_mb, overlap=overlap, compressor=compressor)
        self.period = period
        self.node = comm.node_comm()
        # The world duplicate made by AllreduceStrategy carries the rounds across
        # nodes; gradient buckets reduce over a duplicate of the node communicator.
        self.average_comm = self.reduce_comm
        self.average_algorithm = "hierarchical"
        self.reduce_comm = self.node.dup()

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> HierarchicalStrategy:
        return cls(comm, period=spec.params["period"], algorithm=options.get("algorithm", "auto"),
                   bucket_mb=options.get("bucket_mb", 25.0), overlap=options.get("overlap", True),
                   compressor=build_compressor(options.get("compression")))

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        assert self.buckets is not None
        self.buckets.weight = 1.0 / self.node.size

    def begin_step(self, local_samples: int, global_samples: int | None = None) -> None:
        # ``global_samples`` counts the whole job; the weight needs the node's total.
        node_samples = self.node.allreduce_scalars([local_samples])[0]
        assert self.buckets is not None, "attach() must run first"
        self.buckets.weight = local_samples / node_samples if node_samples > 0 else 0.0

    def reduce_gradients(self) -> None:
        assert self.buckets is not None, "attach() must run first"
        self.buckets.flush()
        self.buckets.weight = 1.0 / self.node.size

    def after_step(self) -> None:
        if self.steps % self.period == 0:
            self.average_model()

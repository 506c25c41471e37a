"""A Cartesian process grid: data-parallel replicas x pipeline stages x tensor-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

from hpcdl.comm import Communicator
from hpcdl.errors import ConfigError


def data_parallel_size(world_size: int, pipeline_stages: int, tensor_parallel: int) -> int:
    """Return D = world_size / (P * T), or raise ConfigError showing the arithmetic."""
    if pipeline_stages < 1 or tensor_parallel < 1:
        raise ConfigError(f"Invalid grid: pipeline-stages={pipeline_stages} and tensor-parallel={tensor_parallel} "
                          "must both be 1 or more.")
    model_parallel = pipeline_stages * tensor_parallel
    replicas, remainder = divmod(world_size, model_parallel)
    if remainder or replicas < 1:
        fits = [model_parallel * k for k in range(1, 4)]
        raise ConfigError(
            f"Invalid process grid: {world_size} ranks cannot be split into pipeline-stages={pipeline_stages} x "
            f"tensor-parallel={tensor_parallel} x data-parallel replicas, because the rank count must equal "
            f"P*T*D = {pipeline_stages}*{tensor_parallel}*D = {model_parallel}*D and {world_size} is not a "
            f"multiple of {model_parallel}. Run with {', '.join(map(str, fits))}, ... ranks, "
            f"or change --pipeline-stages / --tensor-parallel.")
    return replicas


@dataclass
class ProcessGrid:
    """This rank's place in a D x P x T Cartesian grid and the communicators along each axis.

    The grid is ``MPI_Cart_create`` over the world with dims ``(D, P, T)`` and no
    reordering, so world rank ``r = (d * P + p) * T + t``. The ranks of one
    tensor-parallel group are therefore neighbours, on one node when the launcher
    places ranks by node. The data-parallel coordinate varies slowest.

    Attributes:
        world: the world communicator.
        data: the D ranks that hold the same shard of the model (same p, t).
        pipeline: the P stages of one replica (same d, t); its rank is the stage.
        tensor: the T ranks that split each layer (same d, p).
        model: the P*T ranks of one replica (same d), over which the norms of
            sharded gradients are summed.

    Example:
        >>> grid = ProcessGrid.create(Communicator(), pipeline_stages=2, tensor_parallel=1)
        >>> grid.stage, grid.data_rank, grid.data_parallel
    """

    world: Communicator
    data: Communicator
    pipeline: Communicator
    tensor: Communicator
    model: Communicator
    data_parallel: int
    pipeline_stages: int
    tensor_parallel: int

    @classmethod
    def create(cls, world: Communicator, *, pipeline_stages: int = 1, tensor_parallel: int = 1) -> ProcessGrid:
        """Build the grid collectively on every rank of ``world``.

        Raises:
            ConfigError: the world size is not a multiple of P*T.
        """
        replicas = data_parallel_size(world.size, pipeline_stages, tensor_parallel)
        cart = world.comm.Create_cart([replicas, pipeline_stages, tensor_parallel],
                                      periods=[False, False, False], reorder=False)

        def sub(keep: list[bool]) -> Communicator:
            return Communicator(cart.Sub(keep), ranks_per_node=world.ranks_per_node, counter=world.counter)

        return cls(world=world, data=sub([True, False, False]), pipeline=sub([False, True, False]),
                   tensor=sub([False, False, True]), model=sub([False, True, True]),
                   data_parallel=replicas, pipeline_stages=pipeline_stages, tensor_parallel=tensor_parallel)

    @property
    def stage(self) -> int:
        """This rank's pipeline stage, 0 to P-1."""
        return self.pipeline.rank

    @property
    def tensor_rank(self) -> int:
        """This rank's index in its tensor-parallel group, 0 to T-1."""
        return self.tensor.rank

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel replica, 0 to D-1."""
        return self.data.rank

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline_stages - 1

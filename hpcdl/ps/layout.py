"""Role assignment: which ranks of a job serve parameters and which train."""

from __future__ import annotations

from dataclasses import dataclass

from hpcdl.comm import Communicator

# Strategies that run parameter-server ranks.
PS_STRATEGIES = ("async", "ssp", "bsp-ps")


@dataclass
class PSLayout:
    """The roles of the ranks of one job.

    Attributes:
        comm: a duplicate of the world communicator that carries only
            parameter-server traffic.
        server_ranks: world ranks that serve shards; shard i lives on server_ranks[i].
        worker_ranks: world ranks that train.
        worker_comm: the communicator over the workers, None on server ranks.
    """

    comm: Communicator
    server_ranks: list[int]
    worker_ranks: list[int]
    worker_comm: Communicator | None

    @property
    def is_server(self) -> bool:
        return self.comm.rank in self.server_ranks


_layout: PSLayout | None = None


def create_layout(world: Communicator, ps_ranks: int, *, standalone_server: bool = False) -> PSLayout:
    """Assign server and worker roles; a collective call on every rank of ``world``.

    Ranks started as ``hpcdl ps`` (``standalone_server``) serve. When no rank was
    started that way, world ranks ``0 .. ps_ranks-1`` serve.

    Raises:
        ValueError: standalone servers exist, but their count differs from ``ps_ranks``
            on a training rank, or no rank would train.
    """
    global _layout
    flags = world.allreduce_scalars(_one_hot(world, standalone_server))
    standalone = [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
    if standalone:
        servers = standalone
        if not standalone_server and ps_ranks != len(servers):
            raise ValueError(f"the job has {len(servers)} 'hpcdl ps' ranks but --ps-ranks is {ps_ranks}; "
                             f"pass --ps-ranks {len(servers)}")
    else:
        servers = list(range(ps_ranks))
    workers = [rank for rank in range(world.size) if rank not in servers]
    if not workers:
        raise ValueError(f"a job of {world.size} ranks with {len(servers)} server ranks has no worker")
    comm = world.dup()
    worker_comm = world.split(0 if world.rank in workers else 1)
    _layout = PSLayout(comm, servers, workers, None if world.rank in servers else worker_comm)
    return _layout


def _one_hot(world: Communicator, flag: bool) -> list[float]:
    values = [0.0] * world.size
    values[world.rank] = 1.0 if flag else 0.0
    return values


def current_layout() -> PSLayout | None:
    """Return the layout this process created, or None outside a parameter-server job."""
    return _layout

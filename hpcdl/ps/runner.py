"""Start a parameter-server job: assign roles, hand the config to the servers, serve."""

from __future__ import annotations

from hpcdl.comm import Communicator
from hpcdl.config import TrainConfig
from hpcdl.ps import protocol as p
from hpcdl.ps.layout import PS_STRATEGIES, PSLayout, create_layout
from hpcdl.ps.server import ServerSettings, ShardServer


def uses_parameter_server(strategy: str) -> bool:
    """Return True when the strategy spec trains through parameter-server ranks."""
    return strategy.partition(":")[0].strip() in PS_STRATEGIES


def server_settings(config: TrainConfig) -> ServerSettings:
    """Build a shard's settings from the run's config."""
    from hpcdl.strategies import parse_strategy

    spec = parse_strategy(config.strategy)
    mode = {"async": "async", "ssp": "ssp", "bsp-ps": "bsp"}[spec.name]
    return ServerSettings(mode=mode, staleness=int(spec.params.get("staleness", 0)),
                          staleness_lr=bool(spec.params.get("staleness_lr", False)),
                          timeout_s=config.ps_timeout_s, optimizer=config.optimizer,
                          momentum=config.momentum if config.optimizer == "sgd" else 0.0,
                          nesterov=config.nesterov, weight_decay=config.weight_decay,
                          compression=config.compression)


def start_job(world: Communicator, config: TrainConfig | None) -> tuple[Communicator | None, int]:
    """Assign roles on every rank; serve on server ranks and return the worker communicator elsewhere.

    ``config`` is None on ranks started as ``hpcdl ps``; they receive the first
    worker's config. Returns ``(worker communicator, 0)`` on a worker, and
    ``(None, workers lost)`` on a server rank once every worker has finished.
    """
    # NOTE: when the training ranks of an MPMD job reject their config, they exit
    # before this collective, and 'hpcdl ps' ranks wait here until the launcher stops them.
    layout = create_layout(world, config.ps_ranks if config is not None else 0,
                           standalone_server=config is None)
    if layout.is_server:
        source = layout.worker_ranks[0]
        received = layout.comm.comm.recv(source=source, tag=p.TAG_CONTROL)
        return None, serve(layout, TrainConfig(**received))
    if layout.comm.rank == layout.worker_ranks[0]:
        for server in layout.server_ranks:
            layout.comm.comm.send(config.to_dict(), dest=server, tag=p.TAG_CONTROL)
    return layout.worker_comm, 0


def serve(layout: PSLayout, config: TrainConfig) -> int:
    """Run this rank's shard until every worker has finished; return the number of workers lost."""
    shard = layout.server_ranks.index(layout.comm.rank)
    return ShardServer(layout.comm, shard, layout.worker_ranks, server_settings(config)).serve()

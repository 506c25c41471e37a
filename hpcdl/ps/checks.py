"""Checks of parameter-server and Hogwild settings, run before any rank starts."""

from __future__ import annotations

from hpcdl.config import TrainConfig, parse_push_delay
from hpcdl.errors import ConfigError
from hpcdl.ps.layout import PS_STRATEGIES


def training_ranks(config: TrainConfig, world_size: int) -> int:
    """Return how many of ``world_size`` ranks train: all but the server ranks of a parameter-server job."""
    if config.strategy.partition(":")[0].strip() in PS_STRATEGIES:
        return world_size - config.ps_ranks
    return world_size


def check_ps_config(config: TrainConfig, world_size: int) -> None:
    """Raise ConfigError for parameter-server or Hogwild settings that cannot work on ``world_size`` ranks."""
    name = config.strategy.partition(":")[0].strip()
    uses_ps = name in PS_STRATEGIES

    if config.ps_ranks < 1:
        raise ConfigError(f"Invalid ps-ranks={config.ps_ranks}: it must be 1 or more.")
    if config.ps_ranks != 1 and not uses_ps:
        raise ConfigError(f"Invalid ps-ranks={config.ps_ranks} with strategy {name!r}: server ranks exist only "
                          f"for {', '.join(PS_STRATEGIES)}. Drop --ps-ranks or pick one of those strategies.")
    if config.ps_timeout_s <= 0:
        raise ConfigError(f"Invalid ps-timeout-s={config.ps_timeout_s}: it must be greater than 0.")
    push_delay = parse_push_delay(config.push_delay)
    if push_delay is not None and not uses_ps:
        raise ConfigError(f"Invalid push_delay={config.push_delay!r}: it delays pushes, so it needs one of "
                          f"{', '.join(PS_STRATEGIES)}.")

    if uses_ps or name == "hogwild":
        if config.precision == "fp16":
            raise ConfigError(f"Invalid precision='fp16' with strategy {name!r}: its workers do not agree on "
                              "a loss scale. Use bf16 or fp32.")
        if config.pipeline_stages > 1 or config.tensor_parallel > 1:
            raise ConfigError(f"Strategy {name!r} cannot be combined with pipeline or tensor parallelism. "
                              "Use allreduce with --pipeline-stages or --tensor-parallel.")
    if uses_ps:
        workers = world_size - config.ps_ranks
        if workers < 1:
            raise ConfigError(f"Invalid -n {world_size} with ps-ranks={config.ps_ranks}: strategy {name!r} "
                              f"needs at least one worker beside the server ranks. Use -n {config.ps_ranks + 1} "
                              "or more.")
        if push_delay is not None and push_delay[0] >= workers:
            raise ConfigError(f"Invalid push_delay={config.push_delay!r}: worker {push_delay[0]} does not exist; "
                              f"this job has workers 0 to {workers - 1}.")

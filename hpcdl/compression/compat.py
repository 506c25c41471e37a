"""Compatibility of compressors with strategies, checked before any rank starts."""

from __future__ import annotations

from hpcdl.errors import ConfigError
from hpcdl.specs import Spec

# Strategies that sum what they exchange through ``Compressor.allreduce`` or
# ``Compressor.allreduce_delta``; every compressor fits them.
SUMMING_STRATEGIES = ("allreduce", "local-sgd", "hierarchical", "diloco")

# Parameter-server strategies send one worker's update to a server. A class
# that sets ``compresses_pushes = True`` encodes each push with
# ``Compressor.encode`` and its shards decode it, so it fits every compressor.
PUSH_STRATEGIES = ("async", "ssp", "bsp-ps")


def check_compression(strategy: Spec, compression: Spec) -> None:
    """Raise ConfigError when ``compression`` cannot be used with ``strategy``."""
    if compression.name == "none" or strategy.name in SUMMING_STRATEGIES:
        return
    if strategy.name == "hogwild":
        raise ConfigError(
            f"Invalid compression {compression.name!r} with strategy 'hogwild': hogwild writes updates "
            "straight into a shared MPI window, so there is no message to compress. "
            "Use --compression none, or a strategy such as allreduce or local-sgd.")
    if strategy.name in PUSH_STRATEGIES:
        from hpcdl.strategies import strategy_class

        if not getattr(strategy_class(strategy.name), "compresses_pushes", False):
            raise ConfigError(
                f"Invalid compression {compression.name!r} with strategy {strategy.name!r}: this strategy "
                "does not compress its pushes to the parameter server yet. Use --compression none, "
                "or a strategy such as allreduce or local-sgd.")
        return
    raise ConfigError(
        f"Invalid compression {compression.name!r} with strategy {strategy.name!r}: this strategy does not "
        "send its updates through a compressor. Use --compression none, or one of the strategies "
        f"{', '.join(SUMMING_STRATEGIES)}.")

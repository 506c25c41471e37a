"""Parameter-server ranks and their client: sharding, the wire protocol, the server loop."""

from hpcdl.ps.protocol import ParameterServerError, shard_bounds

__all__ = ["ParameterServerError", "shard_bounds"]

"""hpcdl: MPI-native distributed deep learning for PyTorch.

Example:
    >>> import hpcdl
    >>> hpcdl.init()
    >>> model, optimizer = hpcdl.wrap(model, optimizer, strategy="allreduce")
    >>> ...  # the usual loop: zero_grad, backward, optimizer.step()
    >>> hpcdl.finish(model, optimizer)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use: importing mpi4py.MPI initializes MPI, which the
# launcher process (``hpcdl train -n N``) must not do.
_LAZY = {
    "init": "hpcdl.api",
    "wrap": "hpcdl.api",
    "finish": "hpcdl.api",
    "context": "hpcdl.api",
    "DistributedOptimizer": "hpcdl.api",
    "Trainer": "hpcdl.trainer",
    "TrainConfig": "hpcdl.config",
    "Communicator": "hpcdl.comm",
    "ConfigError": "hpcdl.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcdl' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]

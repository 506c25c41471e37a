"""The Python API: init(), wrap(), finish() and the distributed optimizer."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import parse_compression
from hpcdl.compression.compat import check_compression
from hpcdl.errors import ConfigError
from hpcdl.log import setup_logging
from hpcdl.strategies import Strategy, build_strategy, parse_strategy
from hpcdl.transforms import GradientTransforms

log = logging.getLogger(__name__)


@dataclass
class Context:
    """The process's place in the job: its communicator, rank and world size."""

    comm: Communicator
    rank: int
    size: int
    local_rank: int
    local_size: int


_context: Context | None = None


def init(*, ranks_per_node: int = 0, log_level: str | None = None, set_threads: bool = True) -> Context:
    """Initialize MPI, logging and torch threads for this rank, once per process.

    Safe to call again; later calls return the same context.

    Args:
        ranks_per_node: group consecutive ranks into nodes of this size; a
            testing aid to emulate several nodes on one machine (0: ask MPI).
        log_level: logging level for hpcdl's loggers.
        set_threads: split the node's cores evenly between its ranks for torch's
            intra-op threads, so ranks do not oversubscribe the CPU. Skipped when
            ``OMP_NUM_THREADS`` is set.

    Example:
        >>> ctx = hpcdl.init()
        >>> print(ctx.rank, ctx.size)
    """
    global _context
    if _context is not None:
        return _context

    from mpi4py import MPI

    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
        atexit.register(MPI.Finalize)
    world = Communicator(MPI.COMM_WORLD, ranks_per_node=ranks_per_node)
    node = world.node_comm()
    setup_logging(world.rank, log_level)
    if set_threads and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // node.size))
    _context = Context(world, world.rank, world.size, node.rank, node.size)
    log.debug("initialized rank %d of %d (node rank %d of %d)", world.rank, world.size, node.rank, node.size)
    return _context


def context() -> Context:
    """Return the current context, initializing MPI first if needed."""
    return _context or init()


class DistributedOptimizer:
    """Wrap a local optimizer so that ``step()`` synchronizes through a strategy.

    Users keep their own loop: ``zero_grad()``, ``backward()``, ``step()``. The
    strategy reduces gradients (or averages parameters) as it prescribes. The
    gradient transforms (clipping, loss scaling, the non-finite guard) run between
    the reduction and the local optimizer's step. LR schedulers take the wrapped
    optimizer, ``dist_optimizer.optimizer``.

    Args:
        optimizer: the local torch optimizer.
        strategy: the attached strategy.
        transforms: the gradient transforms.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: Strategy,
                 transforms: GradientTransforms) -> None:
        self.optimizer = optimizer
        self.strategy = strategy
        self.transforms = transforms
        strategy.grad_transform = transforms.apply

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, as ``torch.optim.Optimizer.zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_sample_count(self, local_samples: int, global_samples: int | None = None) -> None:
        """Weight this rank's gradients by its samples in the coming step.

        Call before the step's first backward. Without it every rank weighs the
        same. With ``global_samples`` omitted, one small all-reduce finds it.
        """
        self.strategy.begin_step(local_samples, global_samples)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without communicating; wrap all but the last micro-batch."""
        with self.strategy.no_sync():
            yield

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss`` times the fp16 loss scale (unchanged at other precisions); backpropagate that."""
        return self.transforms.scale_loss(loss)

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale, or 1 at other precisions."""
        return self.transforms.loss_scale

    def step(self, closure=None) -> Any:
        """Synchronize, transform gradients, and apply the local optimizer's step.

        Returns None on every rank when the non-finite guard skipped the step.
        """
        self.transforms.check_local_gradients()
        return self.strategy.step(closure)

    def state_dict(self) -> dict[str, Any]:
        """Return local optimizer, strategy and transform state for a checkpoint."""
        return {"optimizer": self.optimizer.state_dict(), "strategy": self.strategy.state_dict(),
                "transforms": self.transforms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.transforms.load_state_dict(state.get("transforms", {}))

    def finish(self) -> None:
        """Run the strategy's final synchronization and release its resources."""
        self.strategy.finish()
        self.strategy.close()


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, strategy: str = "allreduce",
         compression: str = "none", clip_norm: float | None = None, algorithm: str = "auto",
         bucket_mb: float = 25.0, comm: Communicator | None = None, precision: str = "fp32",
         max_skipped_steps: int = 20, **options: Any) -> tuple[torch.nn.Module, DistributedOptimizer]:
    """Make ``model`` and ``optimizer`` train data-parallel under ``strategy``.

    Every rank must call it with the same arguments. Parameters and buffers are
    copied from rank 0, so all ranks start from one model.

    Args:
        model: the local model replica.
        optimizer: its local optimizer.
        strategy: a strategy spec, e.g. ``"allreduce"`` or ``"local-sgd:period=8"``.
        compression: a compression spec, e.g. ``"none"``.
        clip_norm: clip the global L2 norm of the averaged gradient to this value.
        algorithm: all-reduce algorithm: ``auto``, ``ring``, ``mpi``, ``hierarchical``.
        bucket_mb: fusion bucket size in MiB.
        comm: the data-parallel communicator; the world communicator by default.
        precision: ``fp32``, ``bf16`` or ``fp16``. With fp16, backpropagate
            ``optimizer.scale_loss(loss)`` so that dynamic loss scaling applies.
        max_skipped_steps: consecutive steps skipped for non-finite gradients
            before every rank raises ``NonFiniteGradientError``; 0 never raises.

    Returns:
        The model (unchanged object) and the distributed optimizer.

    Raises:
        ConfigError: an invalid spec or value.

    Example:
        >>> model, optimizer = hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    """
    if clip_norm is not None and clip_norm <= 0:
        raise ConfigError(f"Invalid clip_norm={clip_norm}: it must be a positive number, or None to disable clipping.")
    comm = comm or context().comm
    spec = parse_strategy(strategy)
    check_compression(spec, parse_compression(compression))
    strat = build_strategy(spec, comm, algorithm=algorithm, bucket_mb=bucket_mb,
                           compression=compression, **options)
    strat.attach(model, optimizer)
    transforms = GradientTransforms(strat, clip_norm=clip_norm, precision=precision,
                                    max_skipped_steps=max_skipped_steps)
    return model, DistributedOptimizer(optimizer, strat, transforms)


def finish(model: torch.nn.Module, optimizer: DistributedOptimizer) -> None:
    """End training, after which every rank has bit-identical parameters and buffers.

    Example:
        >>> hpcdl.finish(model, optimizer)
    """
    optimizer.finish()

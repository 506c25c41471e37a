"""Gradient clipping by the global L2 norm over the shards of a pipeline- and tensor-parallel model."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from hpcdl.comm import Communicator
from hpcdl.parallel.tensor import is_tensor_parallel


def global_grad_norm(params: Iterable[torch.Tensor], model_comm: Communicator, tensor_rank: int) -> float:
    """Return the L2 norm of the whole model's gradient, the same on every rank of ``model_comm``.

    Each rank sums the squares of its own gradients. Parameters split across
    the tensor-parallel group (``tensor_parallel = True``) count on every rank,
    because each rank has a different slice. Replicated parameters count only
    on tensor-parallel rank 0, so they are not counted T times. Pipeline stages
    hold disjoint layers, so the sum over ``model_comm`` (every stage and
    tensor-parallel rank of one replica) covers each parameter once.

    Args:
        params: this rank's parameters; those without ``.grad`` are skipped.
        model_comm: the P*T ranks of one data-parallel replica.
        tensor_rank: this rank's index in its tensor-parallel group.
    """
    squares = 0.0
    for param in params:
        if param.grad is None:
            continue
        if tensor_rank != 0 and not is_tensor_parallel(param):
            continue
        squares += float(param.grad.detach().double().pow(2).sum())
    total = float(model_comm.allreduce_scalars([squares])[0])
    return math.sqrt(total)


def clip_grad_norm_global(params: Iterable[torch.Tensor], max_norm: float, model_comm: Communicator,
                          tensor_rank: int) -> tuple[float, float]:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does.

    Every rank of ``model_comm`` must call it. Returns ``(norm, scale)``, which
    are identical on every rank.

    Example:
        >>> norm, scale = clip_grad_norm_global(stage.parameters(), 1.0, grid.model, grid.tensor_rank)
    """
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, model_comm, tensor_rank)
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for param in params:
            param.grad.mul_(scale)
    return norm, scale

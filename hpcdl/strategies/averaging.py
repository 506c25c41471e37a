"""Average model tensors across ranks through one flat buffer per dtype."""

from __future__ import annotations

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy same-dtype tensors into one new contiguous 1-D tensor, in order."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors``, in order."""
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        tensor.data.copy_(flat[offset:offset + size].view_as(tensor))
        offset += size


def average_tensors(tensors: list[torch.Tensor], comm: Communicator, compressor: Compressor, key: str, *,
                    algorithm: str = "auto") -> None:
    """Replace every tensor in place with its mean over the ranks of ``comm``.

    Tensors are grouped by dtype, and each group travels as one flat buffer
    through ``compressor.allreduce_delta`` under the key ``f"{key}.{dtype}"``.
    That call compresses only the change since the previous round, because
    compressing parameter values themselves would destroy them. Every rank must
    pass tensors of the same shapes in the same order. Afterwards the tensors
    are identical on every rank, because the compressor returns the same sum
    everywhere.
    """
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    for dtype, group in groups.items():
        flat = flatten(group)
        compressor.allreduce_delta(f"{key}.{str(dtype).removeprefix('torch.')}", flat, comm, algorithm=algorithm,
                                   shapes=[t.shape for t in group])
        flat.div_(comm.size)
        unflatten_into(flat, group)


def integer_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Return the buffers that averaging leaves out, such as BatchNorm's ``num_batches_tracked``."""
    return [b for b in model.buffers() if not b.is_floating_point()]

"""Zero-copy views of torch tensors as MPI buffers."""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

# MPI has no standard 16-bit float types, so float16 and bfloat16 travel as raw
# 16-bit words and are reduced in torch.
_WIRE_DTYPE = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.bool: torch.uint8,
}

_MPI_TYPE = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int8: MPI.SIGNED_CHAR,
    torch.uint8: MPI.UNSIGNED_CHAR,
    torch.int16: MPI.SHORT,
    torch.int32: MPI.INT,
    torch.int64: MPI.INT64_T,
}


def as_buffer(tensor: torch.Tensor) -> list:
    """Return ``[array, mpi_type]`` sharing memory with a contiguous CPU tensor.

    Raises:
        ValueError: if the tensor is not contiguous, not on the CPU, or of a
            dtype MPI cannot carry.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"MPI buffers must be CPU tensors, got device {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous; call .contiguous() first")
    flat = tensor.reshape(-1)
    wire = _WIRE_DTYPE.get(flat.dtype)
    if wire is not None:
        flat = flat.view(wire)
    mpi_type = _MPI_TYPE.get(flat.dtype)
    if mpi_type is None:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent over MPI")
    return [flat.numpy(), mpi_type]


def is_mpi_reducible(dtype: torch.dtype) -> bool:
    """Return True when MPI's built-in SUM reduces ``dtype`` natively."""
    return dtype in _MPI_TYPE


def _torch_sum_op(dtype: torch.dtype):
    def reduce(inbuf, inoutbuf, datatype):  # noqa: ARG001 - MPI user-op signature
        src = torch.from_numpy(np.frombuffer(inbuf, dtype=np.int16)).view(dtype)
        dst = torch.from_numpy(np.frombuffer(inoutbuf, dtype=np.int16)).view(dtype)
        dst.add_(src)

    return reduce


_SUM_OPS: dict[torch.dtype, MPI.Op] = {}


def sum_op(dtype: torch.dtype) -> MPI.Op:
    """Return an MPI op that sums ``dtype``, a user op in torch for 16-bit floats."""
    if is_mpi_reducible(dtype):
        return MPI.SUM
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"no MPI sum for dtype {dtype}")
    if dtype not in _SUM_OPS:
        _SUM_OPS[dtype] = MPI.Op.Create(_torch_sum_op(dtype), commute=True)
    return _SUM_OPS[dtype]

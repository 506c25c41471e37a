"""Measure the activation memory that autograd saves for backward."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ActivationMeter:
    """Bytes of activations that autograd currently saves for backward, and their peak.

    Installed with ``torch.autograd.graph.saved_tensors_hooks`` around forward
    passes. Tensors that share storage with a parameter are not counted. A saved
    tensor stops counting when autograd frees it, after its backward.
    """

    def __init__(self, module: nn.Module) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def _add(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _pack(self, tensor: torch.Tensor) -> object:
        if tensor.untyped_storage().data_ptr() in self._parameter_storages:
            return tensor
        return _CountedTensor(tensor, self)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _CountedTensor) else packed

    def hooks(self) -> contextlib.AbstractContextManager:
        """Return the context manager that counts tensors saved inside it."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


class _CountedTensor:
    __slots__ = ("tensor", "nbytes", "meter")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMeter) -> None:
        self.tensor = tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        self.meter = meter
        meter._add(self.nbytes)

    def __del__(self) -> None:
        self.meter._add(-self.nbytes)

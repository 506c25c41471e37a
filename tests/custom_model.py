"""Model factories that tests load through 'custom_model:NAME' specs."""

from __future__ import annotations

from torch import nn


def build_for_dataset(dataset, scale=1):
    """Build a two-layer linear model sized from ``dataset``, with hidden width ``3 * scale``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(dataset.input_shape[0], 3 * scale), nn.Linear(3 * scale, 1))


def build_fixed():
    """Build a model that ignores the dataset."""
    return nn.Linear(32, 1)


def build_not_a_module(dataset):
    """Return a value that is not an nn.Module, so build_model must reject it."""
    return "not a model"


NOT_CALLABLE = 42

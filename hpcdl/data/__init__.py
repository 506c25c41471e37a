"""Datasets, loaders and deterministic per-rank sharding."""

from hpcdl.data.datasets import (
    DATASET_NAMES,
    DataError,
    Dataset,
    check_dataset_spec,
    load_dataset,
    synthetic_true_weights,
)
from hpcdl.data.sharding import GlobalBatchSampler, shard

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Dataset",
    "GlobalBatchSampler",
    "check_dataset_spec",
    "load_dataset",
    "shard",
    "synthetic_true_weights",
]

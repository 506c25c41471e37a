"""Dataset container, the data error type and helpers shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from hpcdl.errors import ConfigError

SPLIT_SEED = 0
TEST_FRACTION = 0.2


class DataError(ConfigError):
    """Invalid dataset spec, option or file. The message names the value and the fix."""


@dataclass(frozen=True)
class Dataset:
    """In-memory train and test tensors with the metadata that models need.

    ``num_classes`` is the number of classes, the vocabulary size for
    ``task == "language-model"``, and None for regression. ``input_shape`` is
    the shape of one sample of ``x``.
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    input_shape: tuple[int, ...]


def require_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"dataset file not found: {path!r}; check the path after 'csv:' or 'npz:'")
    return file


def reject_options(name: str, options: dict, allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise DataError(f"dataset {name!r} got unknown options {unknown}; valid options: {valid}")


def positive_int(name: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"dataset {name!r} option {key}={value!r} is invalid; use a positive integer")
    return value


def split_classification(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Split 80/20 with ``SPLIT_SEED``, stratified unless a class is too small to stratify."""
    if len(x) < 2:
        raise DataError(f"dataset {name!r} has {len(x)} samples; at least 2 are needed for a train/test split")
    try:
        return tuple(train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y))
    except ValueError:
        # scikit-learn rejects stratification when a class has one sample or the
        # test set is smaller than the number of classes.
        return tuple(train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED))


def classification_dataset(
    name: str, x: np.ndarray, y: np.ndarray, num_classes: int | None = None
) -> Dataset:
    """Split ``x``, ``y`` 80/20 into a classification Dataset with float32 features and int64 labels."""
    x_train, x_test, y_train, y_test = split_classification(name, x, y)
    return Dataset(
        name=name,
        task="classification",
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes if num_classes is not None else int(y.max()) + 1,
        input_shape=tuple(x.shape[1:]),
    )

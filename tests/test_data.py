"""Serial tests for dataset loading, file validation and per-rank sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdl.data import (
    DataError,
    GlobalBatchSampler,
    check_dataset_spec,
    load_dataset,
    shard,
    synthetic_true_weights,
)

SHARDING_CASES = [
    # (num_samples, batch_size, world_size)
    (100, 10, 1),
    (100, 10, 2),
    (100, 8, 3),
    (7, 4, 3),
    (1, 2, 4),
    (4000, 64, 2),
    (1000, 32, 5),
    (33, 5, 7),
]


def rank_indices(num_samples, batch_size, world_size, epoch, step, seed=0, **kwargs):
    samplers = [
        GlobalBatchSampler(num_samples, batch_size, rank, world_size, seed, **kwargs)
        for rank in range(world_size)
    ]
    return [s.indices(epoch, step) for s in samplers]


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), SHARDING_CASES)
def test_sharding_uses_each_sample_once(num_samples, batch_size, world_size):
    for epoch in (0, 3):
        steps = GlobalBatchSampler(num_samples, batch_size, 0, world_size, seed=5).steps_per_epoch()
        used = torch.cat(
            [
                torch.cat(rank_indices(num_samples, batch_size, world_size, epoch, step, seed=5))
                for step in range(steps)
            ]
        )
        assert len(used) == num_samples
        assert sorted(used.tolist()) == list(range(num_samples))


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), SHARDING_CASES)
def test_sharding_steps_agree_across_ranks(num_samples, batch_size, world_size):
    expected = -(-num_samples // (batch_size * world_size))
    for rank in range(world_size):
        sampler = GlobalBatchSampler(num_samples, batch_size, rank, world_size, seed=0)
        assert sampler.steps_per_epoch() == expected
        dropping = GlobalBatchSampler(num_samples, batch_size, rank, world_size, seed=0, drop_last=True)
        assert dropping.steps_per_epoch() == num_samples // (batch_size * world_size)


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), SHARDING_CASES)
def test_sharding_union_equals_single_process_batch(num_samples, batch_size, world_size):
    single = GlobalBatchSampler(num_samples, batch_size * world_size, 0, 1, seed=11)
    for step in range(single.steps_per_epoch()):
        shards = rank_indices(num_samples, batch_size, world_size, epoch=2, step=step, seed=11)
        assert torch.equal(torch.cat(shards), single.indices(2, step))


def test_sharding_splits_like_array_split():
    # 7 samples, batch 4 per rank, 3 ranks: step 0 takes all 7, split 3/2/2.
    shards = rank_indices(7, 4, 3, epoch=0, step=0, shuffle=False)
    expected = np.array_split(np.arange(7), 3)
    assert [s.tolist() for s in shards] == [e.tolist() for e in expected]


def test_sharding_short_batch_can_be_empty():
    # 1 sample over 4 ranks: rank 0 gets it, the rest get empty shards.
    shards = rank_indices(1, 2, 4, epoch=0, step=0)
    assert [len(s) for s in shards] == [1, 0, 0, 0]
    assert shards[1].dtype == torch.int64


def test_sharding_full_batch_gives_batch_size():
    shards = rank_indices(100, 8, 3, epoch=0, step=0)
    assert [len(s) for s in shards] == [8, 8, 8]


def test_sharding_permutation_from_seed_and_epoch():
    sampler = GlobalBatchSampler(50, 50, 0, 1, seed=7)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 4))
    assert torch.equal(sampler.indices(4, 0), expected)
    assert not torch.equal(sampler.indices(0, 0), sampler.indices(1, 0))


def test_sharding_without_shuffle_keeps_order():
    sampler = GlobalBatchSampler(10, 3, 1, 2, seed=0, shuffle=False)
    assert sampler.indices(0, 0).tolist() == [3, 4, 5]
    assert sampler.indices(5, 1).tolist() == [8, 9]


def test_sharding_drop_last_skips_short_batch():
    sampler = GlobalBatchSampler(10, 3, 0, 2, seed=0, drop_last=True)
    assert sampler.steps_per_epoch() == 1
    with pytest.raises(IndexError):
        sampler.indices(0, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": -1},
        {"batch_size": 0},
        {"world_size": 0},
        {"rank": 2},
        {"rank": -1},
    ],
)
def test_sharding_rejects_bad_arguments(kwargs):
    arguments = {"num_samples": 10, "batch_size": 2, "rank": 0, "world_size": 2, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        GlobalBatchSampler(**arguments)


def test_mnist5k_shards_see_all_classes():
    dataset = load_dataset("mnist5k")
    for rank in range(2):
        sampler = GlobalBatchSampler(len(dataset.y_train), 64, rank, 2, seed=0)
        first = dataset.y_train[sampler.indices(0, 0)]
        assert len(first) == 64
        assert set(first.tolist()) == set(range(10))
        labels = torch.cat([dataset.y_train[sampler.indices(0, t)] for t in range(sampler.steps_per_epoch())])
        assert torch.bincount(labels, minlength=10).min() > 150


def test_shard_yields_matching_batches():
    x = torch.arange(23, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(23)
    batches = [list(shard(x, y, batch_size=4, rank=r, world_size=2, seed=3, epoch=1)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 3
    for rank_batches in batches:
        for batch_x, batch_y in rank_batches:
            assert torch.equal(batch_x.squeeze(1).long(), batch_y)
    seen = torch.cat([batch_y for rank_batches in batches for _, batch_y in rank_batches])
    assert sorted(seen.tolist()) == list(range(23))


def test_digits_shapes_and_range():
    dataset = load_dataset("digits")
    assert dataset.task == "classification"
    assert dataset.x_train.shape == (1437, 1, 8, 8)
    assert dataset.x_test.shape == (360, 1, 8, 8)
    assert dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    assert dataset.x_train.min() == 0.0
    assert dataset.x_train.max() == 1.0
    assert dataset.num_classes == 10
    assert dataset.input_shape == (1, 8, 8)


def test_digits_test_set_ignores_run_seed():
    first = load_dataset("digits", seed=0)
    second = load_dataset("digits", seed=123)
    assert torch.equal(first.x_test, second.x_test)
    assert torch.equal(first.y_test, second.y_test)


def test_mnist5k_shapes_and_stratified_split():
    dataset = load_dataset("mnist5k")
    assert dataset.x_train.shape == (4000, 1, 28, 28)
    assert dataset.x_test.shape == (1000, 1, 28, 28)
    assert dataset.x_train.max() == 1.0
    assert dataset.x_train.min() == 0.0
    assert torch.bincount(dataset.y_test).tolist() == [100] * 10
    assert torch.bincount(dataset.y_train).tolist() == [400] * 10
    assert dataset.input_shape == (1, 28, 28)


def test_pycode_windows_are_shifted_tokens():
    dataset = load_dataset("pycode", chars=20_000, context=32)
    num_windows = (20_000 - 1) // 32
    num_test = round(num_windows * 0.1)
    assert dataset.task == "language-model"
    assert dataset.num_classes == 128
    assert dataset.input_shape == (32,)
    assert dataset.x_train.shape == (num_windows - num_test, 32)
    assert dataset.x_test.shape == (num_test, 32)
    assert dataset.x_train.dtype == torch.int64
    assert torch.equal(dataset.y_train[:, :-1], dataset.x_train[:, 1:])
    # Windows do not overlap, so the next window starts at the previous target's last token.
    assert torch.equal(dataset.x_train[1:, 0], dataset.y_train[:-1, -1])
    assert int(dataset.x_train.max()) < 128


def test_pycode_is_deterministic():
    first = load_dataset("pycode", chars=5_000, context=16)
    second = load_dataset("pycode", chars=5_000, context=16)
    assert torch.equal(first.x_train, second.x_train)


def test_pycode_rejects_bad_options():
    with pytest.raises(DataError, match="context"):
        load_dataset("pycode", context=0)
    with pytest.raises(DataError, match="chars"):
        load_dataset("pycode", chars=10, context=64)
    with pytest.raises(DataError, match="bogus"):
        load_dataset("pycode", bogus=1)


def test_synthetic_matches_true_weights():
    dataset = load_dataset("synthetic")
    weight, bias = synthetic_true_weights()
    assert dataset.task == "regression"
    assert dataset.num_classes is None
    assert dataset.x_train.shape == (4096, 32)
    assert dataset.y_train.shape == (4096, 1)
    assert dataset.x_test.shape == (1024, 32)
    residual = dataset.y_test - (dataset.x_test @ weight + bias).unsqueeze(1)
    assert residual.abs().max() < 0.06
    assert residual.std() == pytest.approx(0.01, rel=0.1)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="mnist5k") as info:
        load_dataset("imagenet")
    assert "imagenet" in str(info.value)
    with pytest.raises(DataError, match="digits"):
        check_dataset_spec("imagenet")


def test_csv_with_header_loads(tmp_path):
    path = tmp_path / "table.csv"
    rows = [f"{i},{i * 0.5},{i % 3}" for i in range(30)]
    path.write_text("a,b,label\n" + "\n".join(rows) + "\n\n")
    check_dataset_spec(f"csv:{path}")
    dataset = load_dataset(f"csv:{path}")
    assert dataset.task == "classification"
    assert dataset.num_classes == 3
    assert dataset.input_shape == (2,)
    assert len(dataset.x_train) == 24
    assert len(dataset.x_test) == 6
    assert torch.bincount(dataset.y_test).tolist() == [2, 2, 2]
    assert torch.equal(dataset.x_train[:, 0].long() % 3, dataset.y_train)


def test_csv_without_header_tiny_split(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("1.0,0\n2.0,1\n3.0,2\n")
    dataset = load_dataset(f"csv:{path}")
    assert len(dataset.x_train) + len(dataset.x_test) == 3
    assert dataset.num_classes == 3


CSV_ERRORS = [
    ("empty.csv", "", "no data rows"),
    ("header_only.csv", "a,b\n", "no data rows"),
    ("text_cell.csv", "1,0\n2,x\n", "line 2"),
    ("ragged.csv", "1,2,0\n1,0\n", "line 2"),
    ("one_column.csv", "1\n2\n", "at least one feature"),
    ("float_label.csv", "1,0\n2,0.5\n", "line 2"),
    ("negative_label.csv", "1,-1\n2,0\n", "line 1"),
    ("nan_cell.csv", "1,0\nnan,1\n", "line 2"),
]


@pytest.mark.parametrize(("name", "text", "fragment"), CSV_ERRORS)
def test_csv_errors_name_path(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    for call in (check_dataset_spec, load_dataset):
        with pytest.raises(DataError) as info:
            call(f"csv:{path}")
        assert str(path) in str(info.value)
        assert fragment in str(info.value)


def test_csv_binary_file_raises(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(f"csv:{path}")


@pytest.mark.parametrize("kind", ["csv", "npz"])
def test_missing_file_names_path(tmp_path, kind):
    path = tmp_path / f"absent.{kind}"
    with pytest.raises(DataError, match="not found") as info:
        check_dataset_spec(f"{kind}:{path}")
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="no file path"):
        load_dataset(f"{kind}:")


def test_npz_classification_split(tmp_path):
    path = tmp_path / "data.npz"
    x = np.arange(200, dtype=np.float64).reshape(50, 4)
    y = np.repeat(np.arange(5), 10)
    np.savez(path, x=x, y=y)
    dataset = load_dataset(f"npz:{path}")
    assert dataset.task == "classification"
    assert dataset.num_classes == 5
    assert dataset.x_train.shape == (40, 4)
    assert dataset.x_train.dtype == torch.float32
    assert torch.bincount(dataset.y_test).tolist() == [2] * 5


def test_npz_regression_with_test_arrays(tmp_path):
    path = tmp_path / "regression.npz"
    np.savez(
        path,
        x=np.ones((8, 2, 3)),
        y=np.linspace(0, 1, 8),
        x_test=np.zeros((3, 2, 3)),
        y_test=np.ones(3, dtype=np.float32),
    )
    dataset = load_dataset(f"npz:{path}")
    assert dataset.task == "regression"
    assert dataset.num_classes is None
    assert dataset.input_shape == (2, 3)
    assert dataset.y_train.shape == (8, 1)
    assert dataset.y_test.shape == (3, 1)
    assert dataset.y_train.dtype == torch.float32
    assert torch.equal(dataset.x_test, torch.zeros(3, 2, 3))


NPZ_ERRORS = [
    ("no_y", {"x": np.ones((4, 2))}, "'y'"),
    ("no_x", {"y": np.ones(4)}, "'x'"),
    ("lengths", {"x": np.ones((4, 2)), "y": np.ones(3)}, "4 samples"),
    ("flat_x", {"x": np.ones(4), "y": np.ones(4)}, "shape"),
    ("strings", {"x": np.array([["a", "b"]] * 4), "y": np.ones(4)}, "dtype"),
    ("half_test", {"x": np.ones((4, 2)), "y": np.ones(4), "x_test": np.ones((2, 2))}, "y_test"),
    ("nan", {"x": np.full((4, 2), np.nan), "y": np.ones(4)}, "NaN"),
    ("negative", {"x": np.ones((4, 2)), "y": np.array([0, 1, -1, 0])}, "0..C-1"),
]


@pytest.mark.parametrize(("name", "arrays", "fragment"), NPZ_ERRORS)
def test_npz_errors_name_path(tmp_path, name, arrays, fragment):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_npz_pickled_object_rejected(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.ones(4))
    with pytest.raises(DataError, match="pickle") as info:
        check_dataset_spec(f"npz:{path}")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [("text.npz", b"not a zip archive at all"), ("truncated.npz", b"PK\x03\x04garbage")],
)
def test_npz_malformed_file_raises(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npy_file_rejected(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.ones((4, 2)))
    with pytest.raises(DataError, match="numpy.savez") as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)

"""Process-grid validation, stage splitting and schedules, and a pipelined training run through the CLI."""

from __future__ import annotations

import json

import pytest
from torch import nn

from tests.conftest import HPCDL, read_summary, run_cli
from hpcdl.config import TrainConfig
from hpcdl.data import load_dataset
from hpcdl.errors import ConfigError
from hpcdl.models import build_model
from hpcdl.parallel.checks import builtin_model_layers
from hpcdl.parallel import (balanced_split_points, gpipe_bubble_fraction, micro_batch_sizes, parse_split_points,
                            schedule_ops)
from hpcdl.validate import validate


def test_grid_rejects_rank_count_with_arithmetic():
    config = TrainConfig(pipeline_stages=2, tensor_parallel=2)
    with pytest.raises(ConfigError) as error:
        validate(config, 6)
    message = str(error.value)
    assert "P*T*D = 2*2*D = 4*D" in message
    assert "6 is not a multiple of 4" in message


def test_grid_accepts_multiple_of_model_parallel():
    validate(TrainConfig(model="transformer", dataset="pycode", pipeline_stages=2, tensor_parallel=2), 8)


@pytest.mark.parametrize("changes, fragment", [
    ({"pipeline_schedule": "interleaved"}, "use one of gpipe, 1f1b"),
    ({"micro_batches": 0}, "micro-batches=0"),
    ({"pipeline_stages": 2, "pipeline_split": "3"}, None),
    ({"pipeline_stages": 3, "pipeline_split": "3"}, "3 stages need 2 split points"),
    ({"pipeline_stages": 3, "pipeline_split": "3,2"}, "must be increasing"),
    ({"tensor_parallel": 2, "model": "mlp"}, "--model transformer"),
    ({"tensor_parallel": 3, "model": "transformer", "dataset": "pycode"}, "attention heads"),
    ({"pipeline_stages": 2, "accumulate": 2}, "--micro-batches"),
    ({"pipeline_stages": 2, "precision": "bf16"}, "fp32 only"),
])
def test_parallel_config_checks(changes, fragment):
    config = TrainConfig(**changes)
    world_size = changes.get("pipeline_stages", 1) * changes.get("tensor_parallel", 1)
    if fragment is None:
        validate(config, world_size)
        return
    with pytest.raises(ConfigError, match=fragment.replace("*", r"\*")):
        validate(config, world_size)


@pytest.mark.parametrize("model, dataset", [("linear", "digits"), ("mlp", "digits"), ("cnn", "digits"),
                                            ("linear", "pycode"), ("mlp", "pycode"), ("transformer", "pycode")])
def test_builtin_layer_counts_match_models(model, dataset):
    data = load_dataset(dataset)
    assert len(build_model(model, data, hidden=16)) == builtin_model_layers(model, dataset)


def test_stages_beyond_layers_rejected():
    config = TrainConfig(model="transformer", dataset="pycode", pipeline_stages=6)
    with pytest.raises(ConfigError, match="at most 5 stages"):
        validate(config, 6)


def test_balanced_split_points_by_parameter_count():
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10), nn.Linear(10, 10),
                          nn.Linear(10, 100), nn.Linear(100, 100))
    points = balanced_split_points(model, 2)
    counts = [sum(p.numel() for p in layer.parameters()) for layer in model]
    first, second = sum(counts[:points[0]]), sum(counts[points[0]:])
    # Layer sizes 10100, 0, 1010, 110, 1100, 10100: the best cut is before layer 4, 11220 vs 11200.
    assert points == [4]
    assert max(first, second) == 11220
    assert balanced_split_points(model, 6) == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="at most 6 stages"):
        balanced_split_points(model, 7)


def test_parse_split_points():
    assert parse_split_points(None, 3) is None
    assert parse_split_points("2,4", 3) == [2, 4]
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_split_points("a,b", 3)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 3, 8])
def test_schedules_run_each_micro_batch_once(stages, micro_batches):
    for schedule in ("gpipe", "1f1b"):
        for stage in range(stages):
            ops = schedule_ops(schedule, stages, stage, micro_batches)
            assert sorted(m for kind, m in ops if kind == "F") == list(range(micro_batches))
            assert sorted(m for kind, m in ops if kind == "B") == list(range(micro_batches))
            for index, (kind, m) in enumerate(ops):
                if kind == "B":
                    assert ("F", m) in ops[:index]


@pytest.mark.parametrize("stages", [2, 4])
def test_1f1b_bounds_micro_batches_in_flight(stages):
    micro_batches = 8
    for stage in range(stages):
        in_flight = peak = 0
        for kind, _ in schedule_ops("1f1b", stages, stage, micro_batches):
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == stages - stage
        gpipe_peak = sum(1 for kind, _ in schedule_ops("gpipe", stages, stage, micro_batches) if kind == "F")
        assert gpipe_peak == micro_batches


def test_micro_batch_sizes_uneven_and_short():
    assert micro_batch_sizes(10, 4) == [3, 3, 2, 2]
    assert micro_batch_sizes(3, 8) == [1, 1, 1]
    assert micro_batch_sizes(0, 4) == []


def test_gpipe_bubble_formula():
    assert gpipe_bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert gpipe_bubble_fraction(2, 1) == pytest.approx(0.5)


def test_two_by_two_grid_trains_transformer(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([HPCDL, "train", "-n", "4", "--dataset", "pycode", "--model", "transformer",
                      "--hidden", "32", "--pipeline-stages", "2", "--micro-batches", "3", "--batch-size", "8",
                      "--steps", "24", "--log-every", "6", "--optimizer", "adam", "--lr", "0.01",
                      "--clip-norm", "1.0", "--progress", "off", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.3
    assert all(record["grad_norm"] > 0 for record in records)

    summary = read_summary(run_dir)
    assert (summary["pipeline_stages"], summary["data_parallel"], summary["world_size"]) == (2, 2, 4)
    assert summary["pipeline_bubble_formula"] == pytest.approx(1 / 4)
    assert 0.0 <= summary["pipeline_bubble_fraction"] <= 1.0
    assert len(summary["pipeline_bubble_per_stage"]) == 2
    assert all(peak > 0 for peak in summary["peak_activation_bytes_per_stage"])
    assert (run_dir / "model-stage0-tp0.safetensors").is_file()
    assert (run_dir / "model-stage1-tp0.safetensors").is_file()

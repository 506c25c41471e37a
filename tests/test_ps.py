"""Parameter server and Hogwild: message validation, sharding, and whole training jobs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcdl.ps import protocol as p
from tests.conftest import HPCDL, read_summary, run_cli

WORKERS = frozenset({1, 2, 3})


def _view(numel: int | None = 10, version: int = 5) -> p.ShardView:
    return p.ShardView(shard=0, numel=numel, version=version, worker_ranks=WORKERS, init_rank=1,
                       next_clock={1: 3, 2: 1, 3: 7})


def _valid_push(source: int = 2) -> list[float]:
    return p.make_header(p.Kind.PUSH_PULL, 0, source, numel=10, version=5, clock=1, lr=0.1).tolist()


def test_valid_push_accepted():
    assert p.validate_request(_valid_push(), 2, 40, _view()) == p.Status.OK


@pytest.mark.parametrize("field, value, expected", [
    (p.SHARD, 1, p.Status.BAD_SHARD),
    (p.DTYPE, 2, p.Status.BAD_DTYPE),
    (p.NUMEL, 11, p.Status.BAD_SHAPE),
    (p.NBYTES, 44, p.Status.BAD_LENGTH),
    (p.VERSION, 6, p.Status.BAD_VERSION),
    (p.VERSION, -1, p.Status.BAD_VERSION),
    (p.WORKER, 3, p.Status.BAD_WORKER),
    (p.CLOCK, 2, p.Status.BAD_CLOCK),
    (p.KIND, 99, p.Status.BAD_KIND),
    (p.LR, float("nan"), p.Status.BAD_LR),
    (p.SHARD, 0.5, p.Status.BAD_HEADER),
])
def test_push_field_rejected(field, value, expected):
    header = _valid_push()
    header[field] = value
    assert p.validate_request(header, 2, 40, _view()) == expected


def test_payload_length_mismatch_rejected():
    assert p.validate_request(_valid_push(), 2, 36, _view()) == p.Status.BAD_LENGTH


def test_push_before_init_rejected():
    assert p.validate_request(_valid_push(), 2, 40, _view(numel=None)) == p.Status.NOT_INITIALIZED


def test_init_only_from_first_worker():
    header = p.make_header(p.Kind.INIT, 0, 2, numel=10).tolist()
    assert p.validate_request(header, 2, 40, _view(numel=None)) == p.Status.BAD_WORKER
    header = p.make_header(p.Kind.INIT, 0, 1, numel=10).tolist()
    assert p.validate_request(header, 1, 40, _view(numel=None)) == p.Status.OK


def test_second_init_and_finished_worker_rejected():
    header = p.make_header(p.Kind.INIT, 0, 1, numel=10).tolist()
    assert p.validate_request(header, 1, 40, _view()) == p.Status.ALREADY_INITIALIZED
    finished = p.ShardView(shard=0, numel=10, version=5, worker_ranks=WORKERS, init_rank=1,
                           next_clock={1: 3, 2: 1, 3: 7}, done=frozenset({2}))
    assert p.validate_request(_valid_push(), 2, 40, finished) == p.Status.BAD_WORKER


def test_lost_worker_told_so():
    lost = p.ShardView(shard=0, numel=10, version=5, worker_ranks=WORKERS, init_rank=1,
                       next_clock={1: 3, 2: 1, 3: 7}, lost=frozenset({2}))
    assert p.validate_request(_valid_push(), 2, 40, lost) == p.Status.LOST_WORKER
    assert "raise --ps-timeout-s" in p.STATUS_MESSAGES[p.Status.LOST_WORKER]


def test_compressed_push_length_comes_from_the_shard():
    view = p.ShardView(shard=0, numel=10, version=5, worker_ranks=WORKERS, init_rank=1,
                       next_clock={1: 3, 2: 1, 3: 7}, push_nbytes=24)
    encoded = p.make_header(p.Kind.PUSH_PULL, 0, 2, numel=10, version=5, clock=1, lr=0.1,
                            encoded_nbytes=24).tolist()
    assert p.validate_request(encoded, 2, 24, view) == p.Status.OK
    assert p.validate_request(encoded, 2, 40, view) == p.Status.BAD_LENGTH
    assert p.validate_request(_valid_push(), 2, 40, view) == p.Status.BAD_DTYPE


@settings(max_examples=300, deadline=None)
@given(header=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=12),
       source=st.integers(min_value=0, max_value=5),
       payload_nbytes=st.one_of(st.none(), st.integers(min_value=0, max_value=100)))
def test_random_requests_never_crash_validation(header, source, payload_nbytes):
    status = p.validate_request(header, source, payload_nbytes, _view())
    assert isinstance(status, p.Status)
    if status == p.Status.OK:
        # Whatever is accepted names a known kind, this shard and its real sender.
        assert p.request_kind(header) is not None
        assert int(header[p.SHARD]) == 0
        assert int(header[p.WORKER]) == source
        assert source in WORKERS


@given(numel=st.integers(min_value=0, max_value=10_000), shards=st.integers(min_value=1, max_value=9))
def test_shard_bounds_cover_every_element_once(numel, shards):
    bounds = p.shard_bounds(numel, shards)
    assert len(bounds) == shards
    assert bounds[0][0] == 0
    assert bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_histogram_stats_percentiles():
    counts = torch.zeros(p.HISTOGRAM_BINS, dtype=torch.float64)
    counts[0] = 50
    counts[1] = 49
    counts[7] = 1
    stats = p.histogram_stats(counts)
    assert stats["p50"] == 0
    assert stats["p99"] == 1
    assert stats["max"] == 7
    assert stats["mean"] == pytest.approx((49 + 7) / 100)


@pytest.mark.parametrize("changes, world_size, message", [
    ({"strategy": "async"}, 1, "needs at least one worker"),
    ({"strategy": "allreduce", "ps_ranks": 2}, 4, "server ranks exist only"),
    ({"strategy": "ssp:staleness=1", "push_delay": "5:1"}, 3, "worker 5 does not exist"),
    ({"strategy": "async", "fail_at": "3:5"}, 4, "rank 3 does not exist; this job's workers are 0 to 2"),
    ({"strategy": "bsp-ps", "ps_timeout_s": 0.0}, 3, "ps-timeout-s"),
])
def test_invalid_ps_settings_rejected(changes, world_size, message):
    from hpcdl.config import TrainConfig
    from hpcdl.errors import ConfigError
    from hpcdl.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(**changes), world_size)


def test_hogwild_across_nodes_accepted():
    from hpcdl.config import TrainConfig
    from hpcdl.validate import validate

    validate(TrainConfig(strategy="hogwild", ranks_per_node=1), 2)


def test_ps_without_worker_exits_2():
    result = run_cli([HPCDL, "train", "-n", "1", "--strategy", "async"], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "needs at least one worker" in result.stderr
    assert "Traceback" not in result.stderr


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Every run: digits, a small MLP, server-side or local SGD.
_DIGITS = ["--dataset", "digits", "--model", "mlp", "--hidden", "64", "--batch-size", "16",
           "--progress", "off", "--log-every", "5"]


def test_async_trains_digits(tmp_path):
    run_dir = tmp_path / "async"
    # Three workers each step the model at full rate, so a lower momentum keeps it stable.
    result = run_cli([HPCDL, "train", "-n", "4", "--strategy", "async", "--epochs", "5", "--lr", "0.08",
                      "--momentum", "0.5", "--run-dir", str(run_dir), *_DIGITS])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["world_size"] == 3
    assert summary["test_accuracy"] >= 0.90
    # The run ends once the shard has applied steps x workers pushes; workers
    # still in flight then may each add one more.
    assert 3 * summary["steps"] <= summary["pushes"] < 3 * summary["steps"] + 3
    assert summary["pushes_per_s"] > 0
    for key in ("staleness_mean", "staleness_p50", "staleness_p99", "staleness_max"):
        assert key in summary
    assert all("staleness_max" in record for record in _metrics(run_dir))


def test_async_compressed_pushes_train_digits(tmp_path):
    run_dir = tmp_path / "async-topk"
    result = run_cli([HPCDL, "train", "-n", "4", "--strategy", "async", "--compression", "topk:ratio=0.1",
                      "--epochs", "5", "--lr", "0.08", "--momentum", "0.5", "--run-dir", str(run_dir), *_DIGITS])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["test_accuracy"] >= 0.85
    # Each push carries a tenth of the values plus their int32 indices: at
    # most about a fifth of a float32 gradient, headers included.
    per_push = summary["ps_bytes_received"] / summary["pushes"]
    assert per_push < 0.25 * 4 * summary["parameters"]


def test_async_worker_killed_mid_run_others_finish(tmp_path):
    run_dir = tmp_path / "async-lost"
    # Worker 2 (world rank 3) dies at its step 6 without a word to anyone.
    result = run_cli([HPCDL, "train", "-n", "4", "--strategy", "async", "--epochs", "3", "--lr", "0.08",
                      "--momentum", "0.5", "--fail-at", "2:6", "--ps-timeout-s", "5",
                      "--run-dir", str(run_dir), *_DIGITS], timeout=300)
    # The job reports the dead worker in its exit status, after the others finished.
    assert result.returncode != 0
    assert "rank 3 (worker 2) failed at step 6" in result.stderr
    assert "the other workers go on without it" in result.stderr
    summary = read_summary(run_dir)
    assert summary["lost_workers"] == 1
    # The two survivors did the dead worker's share of the pushes.
    assert summary["pushes"] >= 3 * summary["steps"]
    assert summary["test_accuracy"] >= 0.85
    assert (run_dir / "model.safetensors").is_file()


def test_async_silent_worker_zero_fails(tmp_path):
    # Worker 0 writes the outputs, so async cannot go on without it.
    result = run_cli([HPCDL, "train", "-n", "3", "--strategy", "async", "--push-delay", "0:8",
                      "--ps-timeout-s", "3", "--steps", "6", "--run-dir", str(tmp_path / "slow0"), *_DIGITS],
                     timeout=200)
    assert result.returncode != 0
    assert "worker 0 (world rank 1) is unreachable: it sent nothing" in result.stderr
    assert "raise --ps-timeout-s" in result.stderr


def test_ssp_with_straggler_bounds_staleness(tmp_path):
    run_dir = tmp_path / "ssp"
    result = run_cli([HPCDL, "train", "-n", "4", "--strategy", "ssp:staleness=2", "--push-delay", "0:0.01",
                      "--epochs", "8", "--lr", "0.05", "--run-dir", str(run_dir), *_DIGITS])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["test_accuracy"] >= 0.90
    records = _metrics(run_dir)
    assert records
    assert all(record["clock_gap_max"] <= 2 for record in records)
    assert summary["clock_gap_max"] <= 2
    # The other workers ran ahead of the straggler until the bound stopped them.
    assert summary["clock_gap_max"] >= 1


def test_hogwild_trains_digits(tmp_path):
    run_dir = tmp_path / "hogwild"
    result = run_cli([HPCDL, "train", "-n", "3", "--strategy", "hogwild", "--epochs", "8", "--lr", "0.02",
                      "--run-dir", str(run_dir), *_DIGITS])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["world_size"] == 3
    assert summary["test_accuracy"] >= 0.90


def test_hogwild_two_nodes_trains_digits(tmp_path):
    run_dir = tmp_path / "hogwild-nodes"
    # Two emulated nodes of two ranks: the part of every update that falls in the
    # other node's slice, half of the parameters, travels through MPI_Accumulate.
    result = run_cli([HPCDL, "train", "-n", "4", "--strategy", "hogwild", "--ranks-per-node", "2",
                      "--epochs", "10", "--lr", "0.02", "--run-dir", str(run_dir), *_DIGITS])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    assert summary["world_size"] == 4
    assert summary["test_accuracy"] >= 0.90


def test_hogwild_rejects_separate_memory_model():
    from types import SimpleNamespace

    from mpi4py import MPI

    from hpcdl.strategies.hogwild import require_unified_model

    require_unified_model(SimpleNamespace(model=MPI.WIN_UNIFIED), "shared-memory")
    with pytest.raises(RuntimeError, match="separate model"):
        require_unified_model(SimpleNamespace(model=MPI.WIN_SEPARATE), "shared-memory")


def test_silent_worker_fails_bsp_job(tmp_path):
    result = run_cli([HPCDL, "train", "-n", "3", "--strategy", "bsp-ps", "--push-delay", "1:60",
                      "--ps-timeout-s", "4", "--steps", "4", "--run-dir", str(tmp_path / "bsp"), *_DIGITS],
                     timeout=120)
    assert result.returncode != 0
    assert "worker 1 (world rank 2) is unreachable: it sent nothing" in result.stderr


def test_bsp_ps_resume_restores_server_state(tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    flags = ["--strategy", "bsp-ps", "--steps", "6", "--checkpoint-every", "3", *_DIGITS]
    result = run_cli([HPCDL, "train", "-n", "3", "--run-dir", str(full), *flags])
    assert result.returncode == 0, result.stderr

    # Turn a copy into a run interrupted after step 3, then resume it.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    (resumed / "checkpoints" / "latest").write_text("step-00000003\n")
    (resumed / "model.safetensors").unlink()
    result = run_cli([HPCDL, "train", "-n", "3", "--resume", str(resumed)])
    assert result.returncode == 0, result.stderr

    expected = load_file(full / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name

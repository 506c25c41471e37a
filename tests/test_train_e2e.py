"""End-to-end runs of ``hpcdl train`` on real MPI ranks, started the ways users start them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpcdl.metrics import SUMMARY_KEYS
from tests.conftest import HPCDL, MPIEXEC, ROOT, read_summary, run_cli

QUICK = ["--dataset", "digits", "--model", "mlp", "--hidden", "64", "--progress", "log"]


def test_demo_config_trains_digits_on_two_ranks(tmp_path):
    run_dir = tmp_path / "demo"
    result = run_cli([HPCDL, "train", str(ROOT / "jobs" / "demo.toml"), "-n", "2", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr

    summary = read_summary(run_dir)
    assert summary["test_accuracy"] >= 0.95
    assert summary["world_size"] == 2
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert "test accuracy" in result.stdout
    assert str(run_dir) in result.stdout


def test_summary_has_documented_keys_and_types(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([HPCDL, "train", "-n", "2", *QUICK, "--steps", "12", "--log-every", "4",
                      "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr
    summary = read_summary(run_dir)
    for key, types in SUMMARY_KEYS.items():
        assert key in summary, key
        assert isinstance(summary[key], types), (key, summary[key])
    assert summary["steps"] == 12
    assert summary["samples"] == 12 * 2 * 32
    assert summary["comm_bytes"] > 0
    assert summary["comm_bytes_per_step"] == pytest.approx(summary["comm_bytes"] / 12)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:
        for key in ("step", "epoch", "loss", "lr", "samples", "wall_time_s", "comm_bytes"):
            assert key in record, key
    assert records[-1]["comm_bytes"] >= records[0]["comm_bytes"]


def test_mpiexec_runs_in_place_and_ignores_n(tmp_path):
    run_dir = tmp_path / "inplace"
    # -n 2 inside a 3-rank job must not start a second launcher.
    result = run_cli([MPIEXEC, "-n", "3", HPCDL, "train", "-n", "2", *QUICK, "--steps", "6",
                      "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert read_summary(run_dir)["world_size"] == 3


def test_mpirun_runs_in_place(tmp_path):
    run_dir = tmp_path / "mpirun"
    mpirun = str(Path(MPIEXEC).with_name("mpirun"))
    result = run_cli([mpirun, "-n", "4", HPCDL, "train", *QUICK, "--steps", "4", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert read_summary(run_dir)["world_size"] == 4


def test_bad_input_inside_mpi_job_exits_2_once(tmp_path):
    result = run_cli([MPIEXEC, "-n", "2", HPCDL, "train", "--batch-size", "0", "--run-dir", str(tmp_path / "r")])
    assert result.returncode == 2
    assert result.stderr.count("batch-size=0") == 1
    assert "Traceback" not in result.stderr


def test_python_api_example_script(tmp_path):
    output = tmp_path / "api.json"
    result = run_cli([MPIEXEC, "-n", "2", str(Path(HPCDL).with_name("python")),
                      str(ROOT / "examples" / "train_allreduce.py"), "--epochs", "4", "--output", str(output)])
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["world_size"] == 2
    assert report["test_accuracy"] >= 0.9
    assert report["checksums"][0] == report["checksums"][1]


def test_mnist5k_cnn_reaches_95_percent(tmp_path):
    run_dir = tmp_path / "mnist"
    result = run_cli([HPCDL, "train", "-n", "2", "--dataset", "mnist5k", "--model", "cnn", "--epochs", "3",
                      "--batch-size", "32", "--lr", "0.05", "--progress", "log", "--run-dir", str(run_dir)],
                     timeout=600)
    assert result.returncode == 0, result.stderr
    assert read_summary(run_dir)["test_accuracy"] >= 0.95


def test_injected_failure_ends_every_rank(tmp_path):
    start = time.monotonic()
    result = run_cli([HPCDL, "train", "-n", "3", *QUICK, "--steps", "1000", "--fail-at", "1:5",
                      "--run-dir", str(tmp_path / "fail")], timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 failed at step 5" in result.stderr
    assert "InjectedFailure" in result.stderr
    assert elapsed < 30


def test_resume_matches_uninterrupted_run(tmp_path):
    common = [HPCDL, "train", "-n", "2", *QUICK, "--steps", "30", "--checkpoint-every", "10",
              "--optimizer", "adam", "--lr", "0.01"]
    whole = run_cli([*common, "--run-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr

    broken = run_cli([*common, "--run-dir", str(tmp_path / "broken"), "--fail-at", "0:25"])
    assert broken.returncode != 0
    assert (tmp_path / "broken" / "checkpoints" / "latest").read_text().strip() == "step-00000020"

    resumed = run_cli([HPCDL, "train", "-n", "2", "--resume", str(tmp_path / "broken")])
    assert resumed.returncode == 0, resumed.stderr

    want = load_file(str(tmp_path / "whole" / "model.safetensors"))
    got = load_file(str(tmp_path / "broken" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "records past the checkpoint must not be duplicated"
    assert read_summary(tmp_path / "broken")["steps"] == 30


def test_corrupt_checkpoint_is_rejected(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([HPCDL, "train", "-n", "2", *QUICK, "--steps", "4", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    rank_file = latest / "rank-00001.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-10] + b"0123456789")

    resumed = run_cli([HPCDL, "train", "-n", "2", "--resume", str(run_dir), "--steps", "8"])
    assert resumed.returncode == 2
    assert "rank-00001.safetensors" in resumed.stderr
    assert "Traceback" not in resumed.stderr


def _loopback_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def test_comm_bytes_match_kernel_counters(tmp_path):
    run_dir = tmp_path / "tcp"
    # Force MPICH's traffic between local ranks onto TCP loopback, where the
    # kernel counts it, instead of shared memory.
    env = {"UCX_TLS": "tcp", "MPIR_CVAR_NOLOCAL": "1", "HPCDL_LOG_LEVEL": "ERROR"}
    before = _loopback_tx_bytes()
    result = run_cli([HPCDL, "train", "-n", "2", "--dataset", "digits", "--model", "mlp", "--hidden", "512",
                      "--steps", "25", "--allreduce", "ring", "--progress", "off", "--checkpoint-every", "1000",
                      "--run-dir", str(run_dir)], env=env)
    counted = _loopback_tx_bytes() - before
    assert result.returncode == 0, result.stderr

    reported = read_summary(run_dir)["comm_bytes"]
    assert reported > 30e6  # the ring traffic dominates start-up and control messages
    assert abs(counted - reported) / counted < 0.10, (counted, reported)

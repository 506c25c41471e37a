"""Slurm templates: rendering errors, and jobs on a real Slurm cluster.

The cluster tests need a reachable Slurm controller. Start a one-node cluster on
this machine with ``sudo tests/slurm/setup_slurm.sh``; .ci/run does that.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import HPCDL, ROOT, read_summary, run_cli
from hpcdl.cli import main

TEMPLATES = sorted(p.stem for p in (ROOT / "slurm").glob("*.sbatch"))
JOB_TIMEOUT_S = 300

# Values that make every template fit the one-node test cluster of setup_slurm.sh.
CLUSTER_VALUES = {
    "nodes": "1",
    "ntasks_per_node": "2",
    "gpus_per_node": "2",
    "cpus_per_task": "1",
    "partition": "debug",
    "time": "5",
    "account": "hpcdl",
    "node_counts": "1",
}


def _slurm_reachable() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


needs_slurm = pytest.mark.skipif(
    not _slurm_reachable(),
    reason="no Slurm controller reachable; run 'sudo tests/slurm/setup_slurm.sh' to start a one-node cluster",
)


def _render(template: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["slurm", "render", template, *args])
    return result.exit_code, result.output


def _declared(template: str) -> set[str]:
    text = (ROOT / "slurm" / f"{template}.sbatch").read_text()
    return set(re.findall(r"^## param ([A-Za-z_]+)", text, flags=re.MULTILINE))


def _cluster_args(template: str, **extra: str) -> list[str]:
    values = {name: value for name, value in CLUSTER_VALUES.items() if name in _declared(template)}
    values.update(extra)
    return [arg for name, value in values.items() for arg in ("--set", f"{name}={value}")]


def _wait_for_job(job_id: str) -> str:
    """Poll scontrol until job ``job_id`` (every element of an array) ends; return its states."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job_info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
        states = re.findall(r"JobState=(\S+)", job_info.stdout)
        if states and all(state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for state in states):
            return " ".join(states)
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"Slurm job {job_id} did not end within {JOB_TIMEOUT_S} s")


@pytest.mark.parametrize("args, message", [
    (["nope"], "not found"),
    (["cpu-single-node", "--time", "1:00:00:00"], "Invalid time"),
    (["cpu-single-node", "--ntasks-per-node", "0"], "Invalid ntasks_per_node"),
    (["cpu-single-node", "--gpus-per-node", "2"], "Unknown parameter gpus_per_node"),
    (["cpu-single-node", "--partition", "a b"], "Invalid partition"),
    (["cpu-single-node", "--set", "novalue"], "expected KEY=VALUE"),
    (["gpu-multi-node-ib", "--gpus-per-node", "0"], "Invalid gpus_per_node"),
    (["scaling-sweep", "--nodes", "2", "--set", "node_counts=1 4"], "exceed the allocation"),
    (["scaling-sweep", "--set", "node_counts=one"], "Invalid node_counts"),
])
def test_render_rejects_bad_values(args, message):
    exit_code, output = _render(*args)
    assert exit_code == 2
    assert message in output


def test_render_fills_and_drops_empty_sbatch_lines(tmp_path):
    output = tmp_path / "job.sbatch"
    exit_code, _ = _render("cpu-single-node", "--ntasks-per-node", "3", "--time", "10", "-o", str(output))
    script = output.read_text()
    assert exit_code == 0
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks-per-node=3\n" in script
    assert "#SBATCH --time=10\n" in script
    assert "--partition" not in script
    assert "{{" not in script
    assert "## param" not in script


def test_render_sweep_array_matches_node_counts():
    exit_code, script = _render("scaling-sweep", "--nodes", "4", "--set", "node_counts=1 2 4")
    assert exit_code == 0
    assert "#SBATCH --array=0-2\n" in script


def test_submit_without_sbatch_explains(tmp_path):
    result = CliRunner().invoke(main, ["slurm", "submit", "cpu-single-node"], env={"PATH": str(tmp_path)})
    assert result.exit_code == 2
    assert "sbatch not found" in result.output


@needs_slurm
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_passes_sbatch_test_only(template, tmp_path):
    script = tmp_path / f"{template}.sbatch"
    exit_code, output = _render(template, *_cluster_args(template, workdir=str(tmp_path)), "-o", str(script))
    assert exit_code == 0, output
    result = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr


@needs_slurm
def test_single_node_job_trains(tmp_path):
    run_dir = tmp_path / "run"
    train_args = f"--dataset digits --model linear --steps 12 --batch-size 16 --log-every 4 --run-dir {run_dir}"
    result = run_cli([HPCDL, "slurm", "submit", "cpu-single-node",
                      *_cluster_args("cpu-single-node", workdir=str(tmp_path), train_args=train_args)])
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert job_id.isdigit()

    state = _wait_for_job(job_id)
    log = next(tmp_path.glob(f"*-{job_id}.out"), None)
    assert state == "COMPLETED", log.read_text() if log else f"no output file in {tmp_path}"
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["steps"] == 12
    assert summary["samples"] == 12 * 16 * 2
    assert 0 <= summary["test_accuracy"] <= 1
    assert summary["comm_bytes"] > 0


@needs_slurm
def test_sweep_array_runs_two_elements(tmp_path):
    script = tmp_path / "sweep.sbatch"
    exit_code, output = _render(
        "scaling-sweep", *_cluster_args("scaling-sweep", workdir=str(tmp_path), node_counts="1 1",
                                        ntasks_per_node="1", sweep_dir=str(tmp_path / "sweep"),
                                        train_args="--dataset digits --model linear --steps 6"),
        "-o", str(script))
    assert exit_code == 0, output
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    states = _wait_for_job(job_id)
    assert states == "COMPLETED COMPLETED", "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    for element in (0, 1):
        summary = read_summary(tmp_path / "sweep" / f"nodes1-element{element}")
        assert summary["world_size"] == 1
        assert summary["steps"] == 6

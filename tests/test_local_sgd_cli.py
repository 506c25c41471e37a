"""Local SGD, hierarchical and DiLoCo through the examples and ``hpcdl train``."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import MPIEXEC, read_summary, run_cli

from hpcdl.config import TrainConfig, parse_inject_nonfinite
from hpcdl.errors import ConfigError
from hpcdl.validate import validate

# Runs each example in turn inside one MPI job, so the job starts only once.
RUN_EXAMPLES = """
import runpy, sys
for spec in sys.argv[1:]:
    path, *args = spec.split()
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")
"""


def test_examples_train_digits_to_accuracy():
    # hierarchical.py runs first because its --ranks-per-node sets up the job's nodes.
    result = run_cli([MPIEXEC, "-n", "2", sys.executable, "-c", RUN_EXAMPLES,
                      "examples/hierarchical.py --ranks-per-node 1", "examples/local_sgd.py", "examples/diloco.py"],
                     env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = {name: float(value)
                for name, value in re.findall(r"^(\S+) test accuracy ([0-9.]+)", result.stdout, re.MULTILINE)}
    assert set(accuracy) == {"hierarchical", "local-sgd", "diloco"}, result.stdout
    for name, value in accuracy.items():
        assert value >= 0.93, f"{name}: {value}"


def test_nonfinite_guard_skips_step_and_counts(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["hpcdl", "train", "-n", "2", "--strategy", "local-sgd:period=4", "--precision", "fp16",
                      "--accumulate", "2", "--clip-norm", "1", "--inject-nonfinite", "1:3", "--steps", "8",
                      "--hidden", "32", "--checkpoint-every", "4", "--progress", "log",
                      "--run-dir", str(run_dir)], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"step 3 skipped on every rank: non-finite gradient on rank 1", result.stderr), result.stderr
    summary = read_summary(run_dir)
    assert summary["skipped_steps"] == 1
    assert summary["steps"] == 8
    assert summary["strategy"] == "local-sgd:period=4"
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "local-sgd:period=0"}, "period"),
    ({"strategy": "diloco:outer_momentum=1.5"}, "outer_momentum"),
    ({"strategy": "diloco:outer_lr=0"}, "outer_lr"),
    ({"strategy": "hierarchical:warmup=3"}, "warmup"),
    ({"inject_nonfinite": "2:1"}, "rank 2 does not exist"),
    ({"inject_nonfinite": "1:5-3"}, "FIRST <= LAST"),
    ({"max_skipped_steps": -1}, "max-skipped-steps"),
    ({"precision": "fp16", "strategy": "async"}, "fp16"),
])
def test_invalid_settings_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(**changes), world_size=2)


def test_fp16_config_accepted():
    validate(TrainConfig(precision="fp16", strategy="diloco:period=4"), world_size=2)


def test_parse_inject_nonfinite_ranges():
    assert parse_inject_nonfinite("1:5") == (1, 5, 5)
    assert parse_inject_nonfinite("0:2-4") == (0, 2, 4)
    assert parse_inject_nonfinite(None) is None

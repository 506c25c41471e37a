"""Bad input is rejected before any rank starts: exit status 2, the value named, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcdl.cli import main
from tests.conftest import HPCDL, run_cli


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1.0,2.0,0\n3.0,oops,1\n")
    return path


@pytest.fixture
def two_rank_run(tmp_path: Path) -> Path:
    """A run directory whose checkpoint was written by 2 ranks."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (run / "config.toml").write_text('dataset = "digits"\nmodel = "mlp"\n')
    (step / "meta.json").write_text(json.dumps({"format": 1, "step": 10, "world_size": 2, "files": {}}))
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    return run


BAD_INPUTS = [
    (["--strategy", "bogus"], "bogus"),
    (["--strategy", "allreduce:period=3"], "period"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--model", "resnet9000"], "resnet9000"),
    (["--model", "no_such_module:factory"], "no_such_module"),
    (["--batch-size", "0"], "batch-size=0"),
    (["--lr", "-0.1"], "lr=-0.1"),
    (["--epochs", "-2"], "epochs=-2"),
    (["--accumulate", "0"], "accumulate=0"),
    (["--momentum", "1.5"], "momentum=1.5"),
    (["--optimizer", "lbfgs"], "lbfgs"),
    (["--precision", "fp8"], "fp8"),
    (["--allreduce", "tree"], "tree"),
    (["--compression", "zip"], "zip"),
    (["--fail-at", "one:two"], "one:two"),
    (["--dataset", "csv:/nonexistent/data.csv"], "/nonexistent/data.csv"),
    (["-n", "0"], "-n 0"),
    (["-n", "-3"], "-n -3"),
]


@pytest.mark.parametrize("args,named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_flag_exits_2_naming_value(args, named):
    result = _invoke(["train", "-n", "2", *args] if "-n" not in args else ["train", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output


def test_malformed_csv_names_file_and_line(bad_csv):
    result = _invoke(["train", "-n", "2", "--dataset", f"csv:{bad_csv}"])
    assert result.exit_code == 2
    assert str(bad_csv) in result.output
    assert "line 3" in result.output


def test_unknown_toml_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nbatchsize = 32\n')
    result = _invoke(["train", str(config), "-n", "2"])
    assert result.exit_code == 2
    assert "batchsize" in result.output
    assert "batch_size" in result.output  # the suggestion


def test_wrongly_typed_toml_value(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = "ten"\n')
    result = _invoke(["train", str(config), "-n", "2"])
    assert result.exit_code == 2
    assert "epochs" in result.output


def test_resume_with_other_rank_count(two_rank_run):
    result = _invoke(["train", "-n", "4", "--resume", str(two_rank_run)])
    assert result.exit_code == 2
    assert "2 ranks" in result.output
    assert "-n 2" in result.output


def test_resume_directory_without_config(tmp_path):
    result = _invoke(["train", "-n", "2", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert str(tmp_path) in result.output


def test_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = _invoke(["train", "-n", "2", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--resume" in result.output
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_bad_input_starts_no_rank(tmp_path):
    result = run_cli([HPCDL, "train", "-n", "2", "--strategy", "local-sgdd", "--run-dir", str(tmp_path / "r")])
    assert result.returncode == 2
    assert "local-sgdd" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_info_reports_mpi_and_torch():
    result = run_cli([HPCDL, "info"])
    assert result.returncode == 0, result.stderr
    assert "MPICH" in result.stdout or "Open MPI" in result.stdout
    assert "torch" in result.stdout
    assert "ring" in result.stdout


def test_diloco_defaults_to_adamw():
    from hpcdl.config import DILOCO_INNER_LR, resolve

    config = resolve(None, {"strategy": "diloco:period=8"})
    assert config.optimizer == "adamw"
    assert config.lr == DILOCO_INNER_LR


def test_diloco_keeps_named_optimizer():
    from hpcdl.config import resolve

    config = resolve(None, {"strategy": "diloco:period=8", "optimizer": "sgd", "lr": 0.1})
    assert config.optimizer == "sgd"
    assert config.lr == 0.1
    assert resolve(None, {"strategy": "local-sgd"}).optimizer == "sgd"


def test_resume_to_fewer_steps_than_checkpoint(two_rank_run):
    result = _invoke(["train", "-n", "2", "--resume", str(two_rank_run), "--steps", "8"])
    assert result.exit_code == 2
    assert "step 10" in result.output


def test_csv_too_small_to_split(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("a,b,label\n1.0,2.0,0\n")
    result = _invoke(["train", "-n", "2", "--dataset", f"csv:{path}"])
    assert result.exit_code == 2
    assert "at least 2" in result.output
    assert "Traceback" not in result.output

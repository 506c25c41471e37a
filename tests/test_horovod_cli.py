"""``hpcdl train --allreduce horovod`` ends with the same model as the ring."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import HPCDL, read_summary, run_cli

pytest.importorskip("horovod.torch", reason="Horovod is not installed; run 'make horovod' to build it")

ARGS = ["-n", "2", "--dataset", "digits", "--model", "mlp", "--hidden", "32", "--steps", "10",
        "--bucket-mb", "0.001", "--progress", "off"]


def test_train_horovod_equals_ring(tmp_path):
    runs = {}
    for algorithm in ("ring", "horovod"):
        run_dir = tmp_path / algorithm
        result = run_cli([HPCDL, "train", *ARGS, "--allreduce", algorithm, "--run-dir", str(run_dir)])
        assert result.returncode == 0, result.stderr
        runs[algorithm] = run_dir

    ring = load_file(runs["ring"] / "model.safetensors")
    horovod = load_file(runs["horovod"] / "model.safetensors")
    assert ring.keys() == horovod.keys()
    for name in ring:
        torch.testing.assert_close(horovod[name], ring[name], rtol=1e-5, atol=1e-6)
    # The Horovod backend counts bytes with the ring's model, so the totals agree.
    assert read_summary(runs["horovod"])["comm_bytes"] == read_summary(runs["ring"])["comm_bytes"]

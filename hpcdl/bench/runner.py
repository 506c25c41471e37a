"""Run ``hpcdl train`` as a subprocess, plainly or behind emulated links, and read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpcdl.bench.emulate import EmulatedLinks, interface_bytes, mpi_environment
from hpcdl.errors import ConfigError


class TrainFailed(RuntimeError):
    """A benchmark's training run exited with a non-zero status."""


def train(ranks: int, flags: list[str], run_dir: Path, links: EmulatedLinks | None = None,
          config_file: str | None = None) -> tuple[dict, list[dict]]:
    """Run one training job of ``ranks`` ranks into ``run_dir``; return (summary, metrics records).

    With ``links``, the ranks run inside the emulation's namespaces, and the summary gains
    ``wire_bytes``: the bytes the kernel counted leaving all ranks' veths, headers included.

    Raises:
        ConfigError: the flags were rejected (exit status 2).
        TrainFailed: the job failed for another reason.
    """
    run_dir = Path(run_dir)
    args = ["train", *([config_file] if config_file else []), *flags, "--progress", "off",
            "--run-dir", str(run_dir)]
    env = dict(os.environ)
    env.setdefault("HPCDL_LOG_LEVEL", "WARNING")
    if links is None:
        command = [sys.executable, "-m", "hpcdl", *args, "-n", str(ranks)]
    else:
        from hpcdl.launch import find_mpiexec

        env.update(mpi_environment(ranks=ranks))
        command = links.mpiexec_command(find_mpiexec(), ranks, [sys.executable, "-m", "hpcdl", *args,
                                                                "--launched"])
    wire_before = _wire_bytes(links, ranks)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wire_after = _wire_bytes(links, ranks)
    if result.returncode == 2:
        raise ConfigError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                          f"hpcdl train rejected {' '.join(flags)}")
    if result.returncode != 0:
        raise TrainFailed(f"'{' '.join(command)}' failed with exit status {result.returncode}:\n"
                          f"{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if links is not None:
        summary["wire_bytes"] = wire_after - wire_before
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    return summary, records


def _wire_bytes(links: EmulatedLinks | None, ranks: int) -> int:
    # The host end of a rank's veth receives what the rank sends.
    if links is None:
        return 0
    return sum(interface_bytes(links.veth(rank))[0] for rank in range(ranks))

"""Write ``metrics.jsonl`` and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Keys every summary.json has, with their JSON types.
SUMMARY_KEYS: dict[str, tuple[type, ...]] = {
    "strategy": (str,),
    "compression": (str,),
    "world_size": (int,),
    "steps": (int,),
    "samples": (int,),
    "epochs": (int, float),
    "wall_time_s": (float,),
    "samples_per_s": (float,),
    "train_loss": (float,),
    "test_loss": (float,),
    "test_accuracy": (float, type(None)),
    "comm_bytes": (int,),
    "comm_bytes_per_step": (float,),
    "skipped_steps": (int,),
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Append one JSON object per logged step to ``metrics.jsonl`` (rank 0 only).

    Args:
        path: the metrics file.
        enabled: False on every rank but 0.
        resume_step: when resuming, drop records past this step, which the
            interrupted run logged after its last checkpoint.
    """

    def __init__(self, path: Path, *, enabled: bool, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._handle = open(self.path, "a") if enabled else None

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` and flush, so a crash loses at most the current line."""
        if self._handle is None:
            return
        self._handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    tmp = Path(path).with_name(".summary.json.tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
    os.replace(tmp, path)

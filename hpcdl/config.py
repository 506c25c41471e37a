"""The training config: defaults, TOML files, flag overrides and validation."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from hpcdl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
PROGRESS_MODES = ("auto", "bar", "log", "off")
ALLREDUCE_ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "horovod")
# Learning rate of DiLoCo's default inner AdamW when the run sets none.
DILOCO_INNER_LR = 1e-3


@dataclass
class TrainConfig:
    """Every setting of a training run. TOML keys and ``--flags`` use these names.

    ``ranks`` is not part of the saved config: the rank count is a property of
    the MPI job.
    """

    strategy: str = "allreduce"
    compression: str = "none"
    allreduce: str = "auto"
    bucket_mb: float = 25.0
    overlap: bool = True

    dataset: str = "digits"
    model: str = "mlp"
    hidden: int = 128
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 512

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0

    accumulate: int = 1
    clip_norm: float | None = None
    precision: str = "fp32"
    max_skipped_steps: int = 20
    inject_nonfinite: str | None = None

    seed: int = 0
    run_dir: str | None = None
    resume: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: str = "auto"
    fail_at: str | None = None
    ranks_per_node: int = 0

    pipeline_stages: int = 1
    tensor_parallel: int = 1
    micro_batches: int = 1
    pipeline_schedule: str = "1f1b"
    pipeline_split: str | None = None

    ps_ranks: int = 1
    ps_timeout_s: float = 120.0
    push_delay: str | None = None
    straggler: str | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_epochs(self) -> int | None:
        """Epochs to run; 5 when neither ``epochs`` nor ``steps`` is set."""
        if self.epochs is None and self.steps is None:
            return 5
        return self.epochs

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a TOML-ready dict (None values left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                if value:
                    out[f.name] = dict(value)
                continue
            if value is not None:
                out[f.name] = value
        return out

    def save(self, path: Path) -> None:
        """Write the resolved config as TOML."""
        path.write_text(tomli_w.dumps(self.to_dict()))


FIELD_NAMES = [f.name for f in fields(TrainConfig)]
_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _normalize_key(key: str) -> str:
    return key.replace("-", "_")


def _coerce(key: str, value: Any) -> Any:
    kind = str(_FIELD_TYPES[key])
    if value is None:
        return None
    if kind.startswith("int") and isinstance(value, bool) is False and isinstance(value, int):
        return value
    if kind.startswith("int"):
        raise ConfigError(f"Invalid {key} = {value!r} in the config: expected an integer.")
    if kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"Invalid {key} = {value!r} in the config: expected a number.")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Invalid {key} = {value!r} in the config: expected true or false.")
    if kind.startswith("str"):
        if isinstance(value, str):
            return value
        raise ConfigError(f"Invalid {key} = {value!r} in the config: expected a string.")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict of known keys.

    Raises:
        ConfigError: missing file, invalid TOML, unknown key or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} not found. Check the path, or pass options as flags instead.")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}.") from None
    return normalize(raw, source=f"config file {str(path)!r}")


def normalize(raw: dict[str, Any], source: str = "the config") -> dict[str, Any]:
    """Check keys against ``TrainConfig`` and coerce value types."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = _normalize_key(key)
        if name not in FIELD_NAMES or name == "extra" and not isinstance(value, dict):
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {source}.{hint} "
                              f"Run 'hpcdl train --help' for the valid options.")
        out[name] = value if name == "extra" else _coerce(name, value)
    return out


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Build a config from defaults, then the TOML file, then command-line overrides.

    Args:
        config_file: an optional TOML file.
        overrides: flag values; entries that are None were not given.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_toml(config_file))
    values.update({k: v for k, v in normalize(overrides, "the flags").items() if v is not None})
    if str(values.get("strategy", "")).partition(":")[0] == "diloco" and "optimizer" not in values:
        # DiLoCo's inner optimizer is AdamW unless the run names another.
        values["optimizer"] = "adamw"
        values.setdefault("lr", DILOCO_INNER_LR)
    return TrainConfig(**values)


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """Return a copy of ``config`` with ``changes`` applied."""
    return dataclasses.replace(config, **changes)


_FAIL_AT = re.compile(r"^(\d+):(\d+)$")


_INJECT_NONFINITE = re.compile(r"^(\d+):(\d+)(?:-(\d+))?$")


def parse_inject_nonfinite(text: str | None) -> tuple[int, int, int] | None:
    """Parse ``RANK:STEP`` or ``RANK:FIRST-LAST`` into (rank, first step, last step)."""
    if text is None:
        return None
    match = _INJECT_NONFINITE.match(text.strip())
    if not match or (match.group(3) is not None and int(match.group(3)) < int(match.group(2))):
        raise ConfigError(f"Invalid inject_nonfinite {text!r}: expected RANK:STEP or RANK:FIRST-LAST with "
                          f"FIRST <= LAST, for example 1:5 or 1:5-8.")
    first = int(match.group(2))
    last = int(match.group(3)) if match.group(3) is not None else first
    return int(match.group(1)), first, last


def parse_fail_at(text: str | None) -> tuple[int, int] | None:
    """Parse ``RANK:STEP`` for the fault-injection option."""
    if text is None:
        return None
    match = _FAIL_AT.match(text.strip())
    if not match:
        raise ConfigError(f"Invalid fail_at {text!r}: expected RANK:STEP, for example 1:5.")
    return int(match.group(1)), int(match.group(2))


_STRAGGLER = re.compile(r"^(\d+):(\d+(?:\.\d*)?)$")


def parse_push_delay(text: str | None) -> tuple[int, float] | None:
    """Parse ``RANK:SECONDS`` for the option that delays one worker before each push."""
    if text is None:
        return None
    match = _STRAGGLER.match(text.strip())
    if not match:
        raise ConfigError(f"Invalid push_delay {text!r}: expected RANK:SECONDS, for example 1:0.05.")
    return int(match.group(1)), float(match.group(2))


_STRAGGLER_FACTOR = re.compile(r"^(\d+):(\d+(?:\.\d*)?)$")


def parse_straggler(text: str | None) -> tuple[int, float] | None:
    """Parse ``RANK:FACTOR`` for the fault injection that slows one rank's compute FACTOR times."""
    if text is None:
        return None
    match = _STRAGGLER_FACTOR.match(text.strip())
    if not match or float(match.group(2)) < 1.0:
        raise ConfigError(f"Invalid straggler {text!r}: expected RANK:FACTOR with FACTOR >= 1, "
                          f"for example 1:4 to make rank 1 compute four times slower.")
    return int(match.group(1)), float(match.group(2))

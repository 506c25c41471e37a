"""Check a whole config before any rank starts; every problem is a ConfigError."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hpcdl import checkpoint
from hpcdl.compression import parse_compression
from hpcdl.compression.compat import check_compression
from hpcdl.config import (ALLREDUCE_ALGORITHMS, OPTIMIZERS, PRECISIONS, PROGRESS_MODES, SCHEDULES,
                          TrainConfig, load_toml, parse_fail_at, parse_inject_nonfinite)
from hpcdl.errors import ConfigError
from hpcdl.strategies import parse_strategy

# Settings that may change when a run is resumed; every other one must match.
RESUMABLE_CHANGES = {"epochs", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                     "fail_at", "resume", "run_dir", "eval_batch_size", "inject_nonfinite"}


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"Invalid {name.replace('_', '-')}={value}: it must be greater than 0.")


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"Invalid {name.replace('_', '-')}={value}: it must be 0 or more.")


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"Invalid {name.replace('_', '-')}={value!r}: use one of {', '.join(choices)}.")


def validate(config: TrainConfig, world_size: int, *, launched: bool = False) -> None:
    """Raise ConfigError for the first invalid setting of a run on ``world_size`` ranks.

    Args:
        config: the resolved config.
        world_size: the number of ranks the job has or will have.
        launched: the run directory was already prepared by ``hpcdl train -n``.
    """
    if world_size < 1:
        raise ConfigError(f"Invalid -n {world_size}: a job needs at least 1 rank.")
    _positive(config, "batch_size", "eval_batch_size", "hidden", "epochs", "steps", "accumulate",
              "lr", "bucket_mb", "clip_norm", "log_every", "keep_checkpoints")
    _non_negative(config, "weight_decay", "warmup_steps", "checkpoint_every", "ranks_per_node", "seed")
    _non_negative(config, "max_skipped_steps")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"Invalid momentum={config.momentum}: it must be in [0, 1).")
    _choice(config, "optimizer", OPTIMIZERS)
    _choice(config, "schedule", SCHEDULES)
    _choice(config, "precision", PRECISIONS)
    _choice(config, "progress", PROGRESS_MODES)
    _choice(config, "allreduce", ALLREDUCE_ALGORITHMS)
    if config.nesterov and (config.optimizer != "sgd" or config.momentum == 0):
        raise ConfigError("Invalid nesterov=true: Nesterov momentum needs --optimizer sgd and --momentum > 0.")
    if config.allreduce == "horovod" and importlib.util.find_spec("horovod") is None:
        raise ConfigError("Invalid allreduce='horovod': Horovod is not installed. Run 'make horovod', "
                          "or pick ring, mpi or hierarchical.")

    strategy_spec = parse_strategy(config.strategy)
    check_compression(strategy_spec, parse_compression(config.compression))
    if config.precision == "fp16" and strategy_spec.name in ("async", "ssp", "bsp-ps"):
        raise ConfigError(f"Invalid precision='fp16' with strategy {strategy_spec.name!r}: parameter-server "
                          "workers push gradients without the shared loss unscaling. Use --precision bf16 or fp32.")
    from hpcdl.config import parse_straggler
    from hpcdl.parallel.checks import check_parallel_config
    from hpcdl.ps.checks import check_ps_config, training_ranks

    check_parallel_config(config, world_size)
    check_ps_config(config, world_size)
    # Fault-injection ranks count the training ranks, which are the workers of a
    # parameter-server job.
    trainers = training_ranks(config, world_size)
    valid_ranks = (f"this job's workers are 0 to {trainers - 1}" if trainers != world_size
                   else f"a job of {world_size} ranks has ranks 0 to {world_size - 1}")
    for key, parsed in (("fail_at", parse_fail_at(config.fail_at)),
                        ("straggler", parse_straggler(config.straggler)),
                        ("inject_nonfinite", parse_inject_nonfinite(config.inject_nonfinite))):
        if parsed is not None and parsed[0] >= trainers:
            raise ConfigError(f"Invalid {key}={getattr(config, key)!r}: rank {parsed[0]} does not exist; "
                              f"{valid_ranks}.")
    _check_data_and_model(config)
    if config.resume:
        _check_resume(config, training_ranks(config, world_size))
    elif config.run_dir and not launched:
        run_dir = Path(config.run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"Run directory {config.run_dir!r} already exists and is not empty. "
                              f"Pass --resume {config.run_dir} to continue it, or choose another --run-dir.")


def _check_data_and_model(config: TrainConfig) -> None:
    from hpcdl.data import check_dataset_spec
    from hpcdl.models import check_model_spec

    check_dataset_spec(config.dataset)
    check_model_spec(config.model, _dataset_task(config.dataset))


def _dataset_task(spec: str) -> str:
    """Return the task of an already checked dataset spec without loading the data."""
    name, _, path = spec.partition(":")
    if name == "npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as arrays:
            return "classification" if arrays["y"].dtype.kind in "iub" else "regression"
    return {"pycode": "language-model", "synthetic": "regression"}.get(name, "classification")


def _check_resume(config: TrainConfig, world_size: int) -> None:
    run_dir = Path(config.resume)
    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        raise ConfigError(f"Cannot resume {config.resume!r}: no config.toml there. "
                          "Pass the run directory of an earlier hpcdl run.")
    saved = load_toml(saved_path)
    current = config.to_dict()
    for key, value in saved.items():
        if key in RESUMABLE_CHANGES:
            continue
        if current.get(key) != value:
            raise ConfigError(f"Cannot resume {config.resume!r}: {key}={current.get(key)!r} differs from the "
                              f"run's {key}={value!r}. Drop the flag, or start a new run.")
    latest = checkpoint.latest(run_dir)
    if latest is None:
        raise ConfigError(f"Cannot resume {config.resume!r}: it has no complete checkpoint. Start a new run.")
    meta = checkpoint.verify(latest, world_size)
    if config.steps is not None and config.steps <= meta["step"]:
        raise ConfigError(f"Cannot resume {config.resume!r} to steps={config.steps}: its latest checkpoint is "
                          f"already at step {meta['step']}. Pass a larger --steps or --epochs.")

"""The ``hpcdl`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hpcdl import __version__
from hpcdl.errors import ConfigError


class UsageFailure(click.ClickException):
    """A one-paragraph error for bad input, with exit status 2 and no traceback."""

    exit_code = 2


def _train_options(func):
    options = [
        click.option("-n", "--ranks", type=int, default=None,
                     help="Start N local ranks with mpiexec. Ignored inside an MPI job."),
        click.option("--strategy", help="Synchronization strategy spec, e.g. allreduce. [allreduce]"),
        click.option("--compression", help="Gradient compression spec. [none]"),
        click.option("--allreduce", help="All-reduce algorithm: auto, ring, mpi, hierarchical, horovod. [auto]"),
        click.option("--bucket-mb", type=float, help="Gradient fusion bucket size in MiB. [25]"),
        click.option("--overlap/--no-overlap", default=None,
                     help="Reduce gradient buckets during backward on a background thread. [on]"),
        click.option("--dataset", help="digits, mnist5k, pycode, synthetic, csv:PATH or npz:PATH. [digits]"),
        click.option("--model", help="linear, mlp, cnn, transformer or package.module:factory. [mlp]"),
        click.option("--hidden", type=int, help="Hidden width of the built-in models. [128]"),
        click.option("--epochs", type=int, help="Epochs to train. [5 unless --steps is given]"),
        click.option("--steps", type=int, help="Optimizer steps to train; overrides --epochs."),
        click.option("--batch-size", type=int, help="Per-rank batch size in samples. [32]"),
        click.option("--eval-batch-size", type=int, help="Per-rank batch size for evaluation. [512]"),
        click.option("--optimizer", help="Local optimizer: sgd, adam, adamw. [sgd]"),
        click.option("--lr", type=float, help="Learning rate. [0.05]"),
        click.option("--momentum", type=float, help="SGD momentum. [0.9]"),
        click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum for sgd. [off]"),
        click.option("--weight-decay", type=float, help="Weight decay. [0]"),
        click.option("--schedule", help="LR schedule after warmup: constant or cosine. [constant]"),
        click.option("--warmup-steps", type=int, help="Linear LR warmup steps. [0]"),
        click.option("--accumulate", type=int, help="Micro-batches per optimizer step. [1]"),
        click.option("--clip-norm", type=float,
                     help="Clip the gradient's global L2 norm to X once per step: the averaged gradient for "
                          "allreduce and hierarchical, each rank's own for local-sgd and diloco."),
        click.option("--precision", help="fp32, bf16 or fp16 autocast; fp16 adds dynamic loss scaling. [fp32]"),
        click.option("--max-skipped-steps", type=int,
                     help="Fail after this many consecutive steps skipped for non-finite gradients; "
                          "0 never fails. [20]"),
        click.option("--seed", type=int, help="Seed; the same seed and config repeat a run. [0]"),
        click.option("--run-dir", help="Output directory. [runs/<timestamp>-<strategy>]"),
        click.option("--resume", help="Continue the run in this directory from its latest checkpoint."),
        click.option("--checkpoint-every", type=int,
                     help="Checkpoint every N steps; 0 checkpoints at each epoch's end. [0]"),
        click.option("--keep-checkpoints", type=int, help="Checkpoints to keep. [2]"),
        click.option("--log-every", type=int, help="Write a metrics record every N steps. [10]"),
        click.option("--progress", help="auto (bar on a terminal), bar, log or off. [auto]"),
        click.option("--ranks-per-node", type=int,
                     help="Group consecutive ranks into nodes of this size to emulate several nodes "
                          "on one machine (testing aid). [0: ask MPI]"),
        click.option("--fail-at", help="Testing aid: make rank RANK raise at step STEP (RANK:STEP); with "
                                       "async, ssp and bsp-ps, RANK is a worker index."),
        click.option("--inject-nonfinite",
                     help="Testing aid: make rank RANK's gradient infinite at step STEP (RANK:STEP or "
                          "RANK:FIRST-LAST)."),
        click.option("--pipeline-stages", type=int,
                     help="Pipeline stages P; the rank count must be P x tensor-parallel x replicas. [1]"),
        click.option("--tensor-parallel", type=int,
                     help="Ranks T that split each transformer block's matrices. [1]"),
        click.option("--micro-batches", type=int, help="Micro-batches per step in the pipeline. [1]"),
        click.option("--pipeline-schedule", help="Pipeline schedule: gpipe or 1f1b. [1f1b]"),
        click.option("--pipeline-split",
                     help="Layer indices where stages 1..P-1 start, e.g. 2,4. [balanced by parameter count]"),
        click.option("--ps-ranks", type=int,
                     help="Parameter-server ranks for async, ssp and bsp-ps; the first K ranks serve. [1]"),
        click.option("--ps-timeout-s", type=float,
                     help="Seconds a parameter-server worker may send nothing: then ssp and bsp-ps fail, "
                          "and async goes on without it (worker 0 excepted). [120]"),
        click.option("--push-delay",
                     help="Testing aid: make worker RANK sleep SECONDS before each push (RANK:SECONDS)."),
        click.option("--straggler",
                     help="Fault injection: slow rank RANK's compute FACTOR times by sleeping after its "
                          "forward and backward passes (RANK:FACTOR, e.g. 1:4); with async, ssp and bsp-ps, "
                          "RANK is a worker index."),
        click.option("--launched", is_flag=True, hidden=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpcdl")
def main() -> None:
    """MPI-native distributed deep learning for PyTorch."""


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@_train_options
def train(config_file: str | None, ranks: int | None, launched: bool, **flags: Any) -> None:
    """Train a model data-parallel across MPI ranks.

    CONFIG_FILE is an optional TOML file whose keys are the option names below
    (with underscores); flags override it. Run under mpiexec, mpirun or srun, or
    give -n N to start N local ranks.

    \b
    Examples:
      hpcdl train -n 2 --dataset digits --model mlp --epochs 5
      mpiexec -n 4 hpcdl train run.toml --strategy allreduce
    """
    from hpcdl import launch
    from hpcdl.log import setup_logging

    try:
        config = _resolve_config(config_file, flags)
        if launch.in_mpi_job() or launched:
            sys.exit(_run_in_place(config, launched))
        if ranks is not None and ranks < 1:
            raise ConfigError(f"Invalid -n {ranks}: a job needs at least 1 rank.")
        world_size = ranks or 1
        setup_logging("-")
        if ranks is not None:
            # This process only starts mpiexec, so importing mpi4py must not make it
            # an MPI process (a singleton init would start an Open MPI daemon, say).
            import mpi4py

            mpi4py.rc.initialize = False
        from hpcdl.validate import validate

        validate(config, world_size)
        if ranks is None:
            sys.exit(_run_in_place(config, launched=False))
        launch.find_mpiexec()
        config_path = _prepare_run_dir(config)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    # Asynchronous workers run on when one of them dies.
    keep_going = config.strategy.partition(":")[0].strip() == "async"
    sys.exit(launch.launch(ranks, ["train", str(config_path), "--launched"], keep_going=keep_going))


def _resolve_config(config_file: str | None, flags: dict[str, Any]):
    from hpcdl.config import replace, resolve

    resume = flags.get("resume")
    if resume and config_file is None:
        saved = Path(resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"Cannot resume {resume!r}: no config.toml there. "
                              "Pass the run directory of an earlier hpcdl run.")
        config_file = str(saved)
    config = resolve(config_file, flags)
    if resume:
        config = replace(config, run_dir=resume)
    return config


def _prepare_run_dir(config) -> Path:
    """Create the run directory and write the resolved config the ranks will read."""
    from hpcdl.config import replace
    from hpcdl.trainer import default_run_dir

    run_dir = Path(config.resume or config.run_dir or default_run_dir(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    config = replace(config, run_dir=str(run_dir))
    path = run_dir / "config.toml"
    if config.resume:
        path = run_dir / ".resume.toml"
    config.save(path)
    return path


def _run_in_place(config, launched: bool) -> int:
    """Run this process as one rank of the MPI job; return its exit status."""
    from hpcdl.run import run_rank

    return run_rank(config, launched=launched)


@main.command()
def ps() -> None:
    """Serve parameters as ranks of their own in an MPMD job.

    Start it under the MPI launcher beside the training ranks; it takes every
    setting from the first training rank. Give the trainers --ps-ranks equal to
    the number of 'hpcdl ps' ranks.

    \b
    Example:
      mpiexec -n 1 hpcdl ps : -n 4 hpcdl train --strategy async --ps-ranks 1
    """
    from hpcdl import launch
    from hpcdl.run import run_server_rank

    if not launch.in_mpi_job():
        raise UsageFailure("'hpcdl ps' runs only under an MPI launcher, next to 'hpcdl train' ranks, for "
                           "example: mpiexec -n 1 hpcdl ps : -n 4 hpcdl train --strategy async")
    sys.exit(run_server_rank())


@main.command()
def info() -> None:
    """Print the MPI library, threading level, torch and backends in use."""
    from hpcdl.info import environment_report

    for key, value in environment_report().items():
        click.echo(f"{key:<18} {value}")


def _register_slurm() -> None:
    from hpcdl.slurm_cli import slurm

    main.add_command(slurm)


_register_slurm()


def _register_bench() -> None:
    from hpcdl.bench.cli import bench, compare

    main.add_command(bench)
    main.add_command(compare)


_register_bench()


if __name__ == "__main__":
    main()

"""Run one rank of a training job and end the whole job if it fails."""

from __future__ import annotations

import logging
import sys

from hpcdl.config import TrainConfig
from hpcdl.errors import ConfigError

log = logging.getLogger(__name__)


def run_rank(config: TrainConfig, *, launched: bool = False) -> int:
    """Validate, train and return an exit status; abort the MPI job if this rank fails.

    Validation is deterministic, so every rank reaches the same verdict: rank 0
    prints the error and all ranks return 2. Any later exception on any rank
    calls ``MPI_Abort``, which ends every rank of the job within seconds. The log
    line names the failing rank, the step and the error.
    """
    from hpcdl.api import init

    ctx = init(ranks_per_node=config.ranks_per_node)
    error = None
    try:
        from hpcdl.validate import validate

        validate(config, ctx.size, launched=launched)
    except ConfigError as exc:
        error = str(exc)
    # Rank 0's verdict decides for all ranks. The run-directory check reads the file
    # system, and rank 0 fills that directory as soon as it passes. A slower rank could
    # then reject the directory and exit while rank 0 waits for it in a collective.
    error = ctx.comm.comm.bcast(error, root=0)
    if error is not None:
        if ctx.rank == 0:
            print(f"Error: {error}", file=sys.stderr)
        return 2

    trainer = None
    try:
        from hpcdl.ps.runner import start_job as start_ps_job
        from hpcdl.ps.runner import uses_parameter_server
        from hpcdl.trainer import Trainer

        if config.pipeline_stages > 1 or config.tensor_parallel > 1:
            from hpcdl.parallel.trainer import ParallelTrainer

            trainer = ParallelTrainer(config)
        elif uses_parameter_server(config.strategy):
            # Server ranks serve until every worker finishes; workers train on
            # their own communicator, so data, evaluation and summaries see only them.
            worker_comm = start_ps_job(ctx.comm, config)
            if worker_comm is None:
                return 0
            trainer = Trainer(config, comm=worker_comm)
        else:
            trainer = Trainer(config)
        summary = trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        step = trainer.step if trainer is not None else "set-up"
        log.error("rank %d failed at step %s: %s: %s", ctx.rank, step, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, KeyboardInterrupt))
        sys.stderr.flush()
        ctx.comm.comm.Abort(1)
        return 1

    if getattr(trainer, "is_root", ctx.rank == 0):
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    accuracy = summary.get("test_accuracy")
    lines = [
        "",
        f"test accuracy   {accuracy:.4f}" if accuracy is not None else f"test loss       {summary['test_loss']:.5f}",
        f"samples/s       {summary['samples_per_s']:.0f}",
        f"communicated    {summary['comm_bytes'] / 1e6:.1f} MB ({summary['comm_bytes_per_step'] / 1e3:.1f} kB/step)",
        f"run directory   {summary['run_dir']}",
    ]
    print("\n".join(lines), flush=True)


def run_server_rank() -> int:
    """Serve parameters as a rank started with ``hpcdl ps``; abort the MPI job if this rank fails.

    The first training rank sends the run's config, so a server rank needs no options.
    """
    from hpcdl.api import init
    from hpcdl.ps.runner import start_job

    ctx = init()
    try:
        start_job(ctx.comm, None)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        log.error("parameter-server rank %d failed: %s: %s", ctx.rank, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, KeyboardInterrupt))
        sys.stderr.flush()
        ctx.comm.comm.Abort(1)
        return 1
    return 0

"""Run one rank of a training job and end the whole job if it fails."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from hpcdl.config import TrainConfig
from hpcdl.errors import ConfigError

log = logging.getLogger(__name__)


def run_rank(config: TrainConfig, *, launched: bool = False) -> int:
    """Validate, train and return an exit status; abort the MPI job if this rank fails.

    Validation is deterministic, so every rank reaches the same verdict: rank 0
    prints the error and all ranks return 2. Any later exception on any rank
    calls ``MPI_Abort``, which ends every rank of the job within seconds. The log
    line names the failing rank, the step and the error. The exception is an
    ``async`` worker other than worker 0: it exits alone, and the others finish.
    """
    from hpcdl.api import init

    ctx = init(ranks_per_node=config.ranks_per_node)
    if config.strategy.partition(":")[0].strip() == "async":
        _ignore_peer_failure_notices()
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
            worker_comm, lost = start_ps_job(ctx.comm, config)
            if worker_comm is None:
                _exit_if_peers_lost(lost)
                return 0
            trainer = Trainer(config, comm=worker_comm)
        else:
            trainer = Trainer(config)
        summary = trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        step = trainer.step if trainer is not None else "set-up"
        rank_label = f"rank {ctx.rank}"
        if trainer is not None and trainer.comm.size != ctx.size:
            rank_label += f" (worker {trainer.comm.rank})"
        log.error("%s failed at step %s: %s: %s", rank_label, step, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, KeyboardInterrupt))
        if _others_go_on(trainer, exc):
            log.error("rank %d leaves the job; the other workers go on without it", ctx.rank)
            _exit_now(1)
        _abort(ctx)
        return 1

    if getattr(trainer, "is_root", ctx.rank == 0):
        _print_summary(summary)
    _exit_if_peers_lost(int(summary.get("lost_workers", 0)))
    return 0


def _ignore_peer_failure_notices() -> None:
    """Ignore the SIGUSR1 that MPICH's Hydra sends every live rank when another rank ends.

    Under ``-disable-auto-cleanup`` that signal's default action would end the
    rank. A Python handler would not do: the interpreter restores the default
    action while it shuts down, and a rank that ends first then kills the
    others with the notice. The shards detect lost workers themselves.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _others_go_on(trainer, exc: BaseException) -> bool:
    """Return True when this rank may fail alone: an independent worker other than worker 0.

    Worker 0 writes the run's outputs and checkpoints, so its failure ends the
    job, and so does Ctrl-C, which reaches every rank.
    """
    if trainer is None or isinstance(exc, KeyboardInterrupt):
        return False
    return bool(getattr(trainer, "independent", False)) and not trainer.is_root


def _exit_if_peers_lost(lost: int) -> None:
    """Leave without ``MPI_Finalize`` when a worker died: finalizing would wait for it forever."""
    if lost > 0:
        log.warning("%d worker(s) were lost during the run; leaving without MPI_Finalize", lost)
        _exit_now(0)


def _abort(ctx) -> None:
    """End every rank of the job, after the process manager has had time to forward the error log."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Hydra forwards output asynchronously and may drop what is still in flight when
    # MPI_Abort ends the job. A short pause lets the failure message reach the user.
    time.sleep(1.0)
    ctx.comm.comm.Abort(1)


def _exit_now(status: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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
        _, lost = start_job(ctx.comm, None)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        log.error("parameter-server rank %d failed: %s: %s", ctx.rank, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, KeyboardInterrupt))
        _abort(ctx)
        return 1
    _exit_if_peers_lost(lost)
    return 0

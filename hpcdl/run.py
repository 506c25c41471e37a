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
    calls ``MPI_Abort``, which ends every rank of the job within seconds; the log
    line names the failing rank, the step and the error.
    """
    from hpcdl.api import init

    ctx = init(ranks_per_node=config.ranks_per_node)
    try:
        from hpcdl.validate import validate

        validate(config, ctx.size, launched=launched)
    except ConfigError as exc:
        if ctx.rank == 0:
            print(f"Error: {exc}", file=sys.stderr)
        return 2

    trainer = None
    try:
        from hpcdl.trainer import Trainer

        trainer = Trainer(config)
        summary = trainer.fit()
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        step = trainer.step if trainer is not None else "set-up"
        log.error("rank %d failed at step %s: %s: %s", ctx.rank, step, type(exc).__name__, exc,
                  exc_info=not isinstance(exc, KeyboardInterrupt))
        sys.stderr.flush()
        ctx.comm.comm.Abort(1)
        return 1

    if ctx.rank == 0:
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

"""Logging with the MPI rank in every record."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int | str) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int | str = "-", level: str | int | None = None) -> None:
    """Send hpcdl's log records to stderr, each tagged with ``rank``.

    Args:
        rank: the MPI rank, or "-" in the launcher process.
        level: a logging level name or number. Defaults to ``$HPCDL_LOG_LEVEL``,
            then INFO.
    """
    level = level or os.environ.get("HPCDL_LOG_LEVEL", "INFO")
    logger = logging.getLogger("hpcdl")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False

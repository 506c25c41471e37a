"""A progress bar on rank 0 when a terminal is attached, plain log lines otherwise."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

log = logging.getLogger("hpcdl.progress")


def wants_bar(mode: str) -> bool:
    """Decide whether to draw a bar: ``bar``, ``log``, ``off`` or ``auto`` (bar on a terminal)."""
    if mode == "bar":
        return True
    if mode in ("log", "off"):
        return False
    return sys.stderr.isatty() or os.environ.get("HPCDL_TTY") == "1"


class Progress:
    """Show training progress on rank 0.

    Args:
        total: total optimizer steps.
        initial: steps already done (when resuming).
        enabled: False on every rank but 0.
        mode: ``auto``, ``bar``, ``log`` or ``off``.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool, mode: str = "auto") -> None:
        self.enabled = enabled and mode != "off"
        self.bar = None
        if self.enabled and wants_bar(mode):
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train", mininterval=0.25)
        self.total = total

    def update(self, step: int, fields: dict[str, str]) -> None:
        """Advance to ``step`` and show ``fields`` (loss, accuracy, samples/s, MB sent)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(fields, refresh=False)
        else:
            log.info("step %d/%d %s", step, self.total, " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

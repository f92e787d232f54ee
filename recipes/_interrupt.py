"""Ctrl-C during ``recipes/train.py``: finish the step, write a checkpoint, stop with one line.

While a :class:`SigintStop` is installed (one process, the main thread), the first SIGINT
only sets ``requested``: the training loop finishes its step, checkpoints it and ends the
run with a message that says how to resume. A second SIGINT interrupts at once, as
usual. Several processes keep Python's default (``KeyboardInterrupt`` in each).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

__all__ = ["SigintStop"]

logger = logging.getLogger("train")


class SigintStop:
    """Turns the first Ctrl-C into a request to stop after the current step.

    Args:
        enabled: install the handler (a single process; ignored outside the main thread).
    """

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.restore()  # a second Ctrl-C interrupts at once
        logger.warning("Ctrl-C: stopping after this step and writing a checkpoint "
                       "(Ctrl-C again to stop at once, without one)")

    def restore(self) -> None:
        """Put the previous handler back (idempotent)."""
        if self._previous is not None:
            previous, self._previous = self._previous, None
            signal.signal(signal.SIGINT, previous if previous is not None
                          else signal.default_int_handler)

    def exit(self, out: Path, step: int, stop: int) -> None:
        """End the run after the checkpoint of ``step``: one line on stderr, exit code 130."""
        sys.stderr.write(f"train.py: stopped by Ctrl-C after step {step} of {stop}; kept "
                         f"{out / 'checkpoints' / f'step_{step:06d}'} and metrics.jsonl; "
                         f"continue with: python recipes/train.py --config "
                         f"{out / 'config.yaml'} --resume\n")
        raise SystemExit(130)

"""Stopping a training run on SIGINT / SIGTERM without losing it: what Ctrl-C, SLURM and Kubernetes send.

    stop = StopRequest(grace_s=25.0)
    with stop.installed():              # SIGINT/SIGTERM handlers while training (main thread only)
        for step in ...:
            ...
            if all_ranks_agree(stop.signum):   # the trainer all-reduces it with the step's loss sums
                save(); raise Interrupted(stop.signum)

The first signal only sets `signum`: every rank finishes its current step, the ranks agree at the step's
own all-reduce (so no rank is left waiting in a collective), a checkpoint is written and the run stops with
the command that resumes it. If that does not happen within `grace_s` (a teacher that does not answer, a
step longer than the grace), the process stops without a checkpoint, saying so; the last complete checkpoint
stays. A second signal stops at once. A signal that comes within `DUPLICATE_WINDOW_S` of the first counts
as the same one: Ctrl-C reaches torchrun and its workers together, and torchrun then forwards it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("asymkd.student")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 2.0


class Interrupted(Exception):
    """The run stopped on a signal after writing its checkpoint (`signum`, `step`)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal handlers of one training run (see the module docstring)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum = 0  # the first signal received; 0 = none
        self._first_at = 0.0
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self._timer is not None:
                self._timer.cancel()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self._first_at = signum, now
            log.warning(
                "%s: stopping after this step and writing a checkpoint (at most %.0f s); send it again to stop "
                "at once", name, self.grace_s,
            )  # fmt: skip
            self._timer = threading.Timer(self.grace_s, self._give_up)
            self._timer.daemon = True
            self._timer.start()
        elif now - self._first_at > DUPLICATE_WINDOW_S:
            _stop_now(f"{name} again: stopping at once, without a checkpoint", signum)

    def _give_up(self) -> None:
        _stop_now(
            f"no checkpoint within checkpoint.stop_grace_s={self.grace_s:g} s: stopping without one "
            "(the last complete checkpoint stays)",
            self.signum,
        )


def _stop_now(message: str, signum: int) -> None:
    """Exit this process now (from a signal handler or the grace timer): no unwinding, no traceback."""
    print(f"[student r{os.environ.get('RANK', '0')}] {message}", file=sys.stderr, flush=True)
    os._exit(128 + signum)

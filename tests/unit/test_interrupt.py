"""The stop request of a training run: the first SIGINT/SIGTERM asks for a checkpoint and a stop, a repeat within
a moment is the same request (Ctrl-C reaches torchrun and its ranks together, and torchrun forwards it), a later
one stops at once, and a stop that does not come within the grace ends the process anyway."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from student_trainer import interrupt
from student_trainer.interrupt import Interrupted, StopRequest


@pytest.fixture()
def stops(monkeypatch):
    """Record the hard stops instead of exiting the test process."""
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(interrupt, "_stop_now", lambda message, signum: calls.append((message, signum)))
    return calls


def test_the_first_signal_only_asks_and_a_quick_repeat_is_the_same_request(stops):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    stop = StopRequest(grace_s=30.0)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # handlers run in the main thread between bytecodes
        assert stop.signum == signal.SIGINT and not stops
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forward of the same Ctrl-C
        time.sleep(0.05)
        assert not stops
    assert signal.getsignal(signal.SIGINT) is before  # restored afterwards


def test_a_later_second_signal_stops_at_once(stops, monkeypatch):
    monkeypatch.setattr(interrupt, "DUPLICATE_WINDOW_S", 0.1)
    stop = StopRequest(grace_s=30.0)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert len(stops) == 1 and "again: stopping at once" in stops[0][0] and stops[0][1] == signal.SIGTERM


def test_no_checkpoint_within_the_grace_ends_the_process_anyway(stops):
    stop = StopRequest(grace_s=0.2)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    assert len(stops) == 1 and "stop_grace_s=0.2" in stops[0][0] and "without one" in stops[0][0]


def test_a_stop_in_time_cancels_the_grace_timer(stops):
    stop = StopRequest(grace_s=0.2)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    time.sleep(0.3)  # the run ended (checkpoint written) before the grace ran out
    assert not stops


def test_outside_the_main_thread_nothing_is_installed():
    seen, before = [], signal.getsignal(signal.SIGTERM)

    def worker():
        with StopRequest(grace_s=1.0).installed() as stop:
            seen.append(stop.signum)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [0] and signal.getsignal(signal.SIGTERM) is before


def test_interrupted_exits_with_128_plus_the_signal():
    e = Interrupted(signal.SIGTERM, 12)
    assert e.exit_code == 143 and "SIGTERM at step 12" in str(e)

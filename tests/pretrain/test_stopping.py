"""GracefulStop's signal rules, in processes forked for the purpose (a signal handled or not
must not reach pytest itself)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from tcsmae.stopping import GracefulStop


def _in_child(target, *args) -> int:
    child = mp.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(30)
    return child.exitcode


def _forked_worker_gets(signum: int, stop: GracefulStop) -> None:
    """A worker forked inside the parent's context: exit code = its own copy's stop request."""
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # a handled signal returns here; an unhandled SIGTERM never does
    os._exit(stop.signum or 0)


@pytest.mark.parametrize("signum,exitcode", [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)])
def test_forked_workers_leave_ctrl_c_to_the_parent_and_die_on_sigterm(signum, exitcode):
    with GracefulStop() as stop:
        assert _in_child(_forked_worker_gets, signum, stop) == exitcode


def _main_process_gets(signals: tuple, pause: float, repeat_s: float, grace_s: float) -> None:
    """A process of its own running GracefulStop: exit code 10 + the stop request, or 2 for
    KeyboardInterrupt; a watchdog exit is 128 + signal."""
    GracefulStop.REPEAT_S, GracefulStop.GRACE_S = repeat_s, grace_s
    try:
        with GracefulStop() as stop:
            for sig in signals:
                os.kill(os.getpid(), sig)
                time.sleep(pause)
            time.sleep(0.2)
            code = 10 + (stop.signum or 0)
    except KeyboardInterrupt:
        code = 2
    os._exit(code)


def test_ctrl_c_twice_within_the_repeat_window_is_one_stop_request():
    """torchrun's agent forwards the terminal's SIGINT to workers that got it already."""
    assert _in_child(_main_process_gets, (signal.SIGINT, signal.SIGINT), 0.0, 2.0, 60.0) == 10 + signal.SIGINT


def test_a_second_ctrl_c_after_the_window_interrupts_at_once():
    assert _in_child(_main_process_gets, (signal.SIGINT, signal.SIGINT), 0.3, 0.1, 60.0) == 2


def test_sigterm_gives_up_after_the_grace_period():
    """The step never finishes (a rank stuck in a collective): exit 143 after GRACE_S."""
    start = time.monotonic()
    assert _in_child(_main_process_gets, (signal.SIGTERM,), 5.0, 2.0, 0.5) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 4.0


def test_sigterm_handled_in_time_exits_normally():
    assert _in_child(_main_process_gets, (signal.SIGTERM,), 0.0, 2.0, 60.0) == 10 + signal.SIGTERM

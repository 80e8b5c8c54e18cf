"""GracefulStop in processes forked inside it (DALI's reader workers on the CPU path)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from tcsmae.stopping import GracefulStop


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # a handled signal returns here; an unhandled SIGTERM never does


@pytest.mark.parametrize("signum,exitcode", [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)])
def test_forked_workers_leave_ctrl_c_to_the_parent_and_die_on_sigterm(signum, exitcode):
    with GracefulStop() as stop:
        child = mp.get_context("fork").Process(target=_signal_self, args=(signum,))
        child.start()
        child.join(30)
        assert child.exitcode == exitcode
        assert stop.signum is None  # the parent was not asked to stop

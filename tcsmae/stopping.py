"""Stop a training run cleanly on SIGTERM or Ctrl-C: finish the step, save, exit.

Schedulers (SLURM before a time limit or preemption, `docker stop`, Kubernetes) send
SIGTERM and kill the process a little later, and a plain Ctrl-C would raise
KeyboardInterrupt in the middle of a step. Inside `GracefulStop` both only set a flag; the
training loop (tcsmae.pretrain.engine) passes it to every step, whose loss all-reduce makes
the ranks agree on it (tcsmae.pretrain.step.train_step), and asks `requested(ctx)` at an
epoch's end; then it saves a checkpoint at that position and raises `TrainingStopped`.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from tcsmae.distributed import DistContext


class TrainingStopped(Exception):
    """Raised after the checkpoint of a run stopped by a signal; `signum`, `step` (global)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum = signum
        self.step = step


class GracefulStop:
    """Context manager turning SIGTERM and the first SIGINT into a stop request.

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    context does nothing and `requested` stays False.

    - A second Ctrl-C more than `REPEAT_S` seconds after the first interrupts at once
      (KeyboardInterrupt, as without the handler). Closer repeats are the same Ctrl-C
      delivered twice (torchrun's agent forwards the terminal's SIGINT to workers that
      already got it).
    - A process that has not stopped `GRACE_S` seconds after SIGTERM (stuck in a collective
      or a data call) exits with 128 + SIGTERM, unsaved, as an unhandled SIGTERM would.
    - Under DDP the signal travels in every step's loss all-reduce and the ranks read it
      with the losses, every `--log-every` steps, so a signal that reaches one rank only, or
      the ranks at different steps, stops all of them after the same step (the next read):
      the checkpoint's barrier never waits for a rank that went on.
    - Processes forked inside the context (DALI's readers on the CPU path) leave Ctrl-C to
      the parent and die on SIGTERM by the default action.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_S = 2.0
    GRACE_S = 120.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._first_at = 0.0
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> "GracefulStop":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker (DALI's readers) inherited the handler
            if signum == signal.SIGTERM:  # default action: a pool's teardown works
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # Ctrl-C reaches the whole process group: the parent decides
        now = time.monotonic()
        if self.signum is not None:
            if signum == signal.SIGINT and now - self._first_at > self.REPEAT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: now
            return
        self.signum, self._first_at = signum, now
        if signum == signal.SIGTERM:
            self._watchdog = threading.Timer(self.GRACE_S, self._give_up, args=(signum,))
            self._watchdog.daemon = True
            self._watchdog.start()
        # os.write, not print: a handler that interrupts a write to stderr must not write through
        # the same buffered stream ("reentrant call")
        _say(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
             + (" (Ctrl-C again to stop at once, unsaved)" if signum == signal.SIGINT else "") + "\n")

    def _give_up(self, signum: int) -> None:
        """Watchdog thread: the run did not stop within GRACE_S; exit like an unhandled signal."""
        _say(f"{signal.Signals(signum).name}: not stopped {self.GRACE_S:.0f} s later (stuck in a collective or a "
             "data call?); exiting without a checkpoint\n")
        os._exit(128 + signum)

    def requested(self, ctx: DistContext) -> int | None:
        """The signal number when any rank was asked to stop, else None (a collective call
        under DDP: every rank must call it at the same point; the loop does at epoch ends)."""
        signum = self.signum or 0
        if ctx.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=ctx.device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None


def _say(text: str) -> None:
    """Write to file descriptor 2, unbuffered (safe inside a signal handler)."""
    try:
        os.write(2, text.encode())
    except OSError:  # stderr closed: the message is all that is lost
        pass


__all__ = ["GracefulStop", "TrainingStopped"]

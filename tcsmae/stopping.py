"""Stop a training run cleanly on SIGTERM or Ctrl-C: finish the step, save, exit.

Schedulers (SLURM before a time limit or preemption, `docker stop`, Kubernetes) send
SIGTERM and kill the process a little later; a plain Ctrl-C raised KeyboardInterrupt in
the middle of a step. Inside `GracefulStop` both only set a flag; the training loop asks
`requested(ctx)` after every step, saves a checkpoint at that position and raises
`TrainingStopped`. A second Ctrl-C interrupts at once (KeyboardInterrupt), as before.

Under DDP every rank asks after the same step and the ranks agree (max over ranks), so a
signal that reaches one rank only, or the ranks at different steps, stops all of them
after the same step: the checkpoint's barrier never waits for a rank that went on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

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
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "GracefulStop":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker (DALI's readers) inherited the handler
            if signum == signal.SIGTERM:  # die as before, so that a pool's teardown works
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # Ctrl-C reaches the whole process group: the parent decides
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # second Ctrl-C: now
        self.signum = self.signum or signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
              + (" (Ctrl-C again to stop at once, unsaved)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)

    def requested(self, ctx: DistContext) -> int | None:
        """The signal number when any rank was asked to stop, else None (a collective call
        under DDP: every rank must call it at the same step)."""
        signum = self.signum or 0
        if ctx.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=ctx.device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None


__all__ = ["GracefulStop", "TrainingStopped"]

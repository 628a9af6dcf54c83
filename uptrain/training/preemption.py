"""Preemption: SIGTERM or SIGINT (a scheduler's notice, Ctrl-C) ends the run at the end of the current optimiser
step, with a checkpoint, on every rank at the same step, and exit status PREEMPTED_EXIT.

The handler only sets a flag; the loop all-reduces it (max) once per optimiser step, so that a rank signalled
alone (or a little later than the others) still stops with them: no rank waits in a collective for one that
left. Under `accelerate launch` the workers run in their own sessions: a signal to the launcher's process group
reaches the launcher, and torch's elastic agent forwards it to the workers (SIGTERM, then SIGKILL after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default: a step plus a checkpoint must fit in it). The launcher then
exits 1 itself (torch re-raises the signal); the workers exit PREEMPTED_EXIT.
"""
from __future__ import annotations

import signal
import threading

from uptrain.errors import UptrainError

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": distinct from a crash (1), bad
# input (2) and a death by signal (128 + n), so a job script can requeue on it.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UptrainError):
    """The run stopped on a signal after saving a checkpoint; `resume: auto` continues it exactly."""

    exit_status = PREEMPTED_EXIT

    def __init__(self, message: str, step: int, checkpoint: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.quiet = quiet  # every rank raises it, the main process alone says it


class StopSignal:
    """Within `with StopSignal() as stop:` SIGTERM and SIGINT set `stop.signum` instead of ending the process;
    the previous handlers come back on exit. A repeated SIGTERM changes nothing (a launcher forwards the one the
    workers may already have had); a second SIGINT (Ctrl-C twice) aborts at once with KeyboardInterrupt.
    Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):  # no printing here: the main thread may be inside a print
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False

    def agreed(self, acc) -> int:
        """The signal any rank received (0: none); one all-reduce, so every rank gets the same answer."""
        import torch

        if acc.num_processes == 1:
            return self.signum
        return int(acc.reduce(torch.tensor(self.signum, device=acc.device), "max").item())


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

"""Stopping a long loop at a safe point: signals, the launcher's request, and data workers.

``scancel``, ``scontrol requeue``, a preemption, ``kill -TERM -- -PGID`` and Ctrl-C signal
*every* process of the job or terminal, DataLoader workers included. A worker killed by the
signal makes the main process raise from inside the step, before anything is saved. So:

- :func:`worker_init` (the ``worker_init_fn`` of every loader) makes workers ignore the stop
  signals; they keep serving batches until the main process shuts them down;
- :class:`StopFlag` catches the stop signals in the main process and records them; the loop
  checks :meth:`StopFlag.reason` at the end of each step (or batch) and stops there;
- :func:`request_stop` is the same request without a signal, used by the Slurm entry point
  for USR2 (time limit, preemption notice), which submitit would otherwise handle mid-step.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

# what the main process turns into a stop at the next safe point
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# what data workers ignore: the stop signals plus Slurm's USR2 warning
WORKER_IGNORED = (*STOP_SIGNALS, signal.SIGUSR2)

_request: str | None = None
_listening = 0  # StopFlag blocks open in this process


def request_stop(reason: str | None) -> None:
    """Ask the running loop of this process to stop at its next safe point (None: withdraw)."""
    global _request
    _request = reason


def pending() -> str | None:
    """The reason given to :func:`request_stop`, if any."""
    return _request


def listening() -> bool:
    """Whether a loop is inside a :class:`StopFlag` block (and so will act on a request)."""
    return _listening > 0


def ignore_stop_signals() -> None:
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)


class WorkerInit:
    """A picklable ``worker_init_fn``: ignore the stop signals, then run ``then(worker_id)``."""

    def __init__(self, then: Callable[[int], Any] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.then is not None:
            self.then(worker_id)


def worker_init(then: Callable[[int], Any] | None = None) -> WorkerInit:
    """``worker_init_fn`` for a DataLoader whose workers must outlive a stop signal."""
    return then if isinstance(then, WorkerInit) else WorkerInit(then)


class StopFlag:
    """SIGTERM/SIGINT/SIGUSR1 set a flag instead of ending the process; a second Ctrl-C ends it.

    ``with StopFlag() as stop: ... if stop.reason(): save and stop``. The previous handlers
    come back on exit, so a signal after the loop has its usual effect.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        global _listening
        _listening += 1
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = signal.Signals(signum).name

    def reason(self) -> str | None:
        """The signal received or the launcher's request; None to go on."""
        return self.requested or _request

    def __exit__(self, *exc: Any) -> None:
        global _listening
        _listening -= 1
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

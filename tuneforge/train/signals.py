"""Stop requests from outside: SIGTERM / SIGUSR1 (Slurm preemption, time limits) and a first Ctrl-C ask the loop
to checkpoint at the next step boundary and exit; a second Ctrl-C stops at once (a checkpoint being written then
is never published, so the previous one stays the newest)."""
from __future__ import annotations

import signal
import threading

SECOND_SIGINT = ("a second Ctrl-C stops at once; the newest complete checkpoint is kept (run the same command again "
                 "to resume from it)")


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not inside a notebook worker)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            self.uninstall()  # the loop will not reach its own uninstall; a caller in this process gets Ctrl-C back
            raise KeyboardInterrupt(SECOND_SIGINT)
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

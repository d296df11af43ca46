"""Ctrl-C during training, never half-way through a parameter update."""
import signal
import threading


class Interrupts:
    """Ctrl-C during training. While the optimizer updates the parameters and the iteration's metrics are recorded
    (phase 'step') the SIGINT is held back until both are complete, so the state is never half-updated; elsewhere it
    raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self):
        self.phase = "idle"
        self.pending = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handler(self, signum, frame):
        if self.phase == "step":
            self.pending = True
            return
        raise KeyboardInterrupt

    def check(self):
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

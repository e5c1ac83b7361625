"""Ctrl-C during training: finish the step, save a checkpoint at it, then stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StopRequest:
    """SIGINT handler for the training steps: the first Ctrl-C asks for a checkpoint and a clean stop, then
    the default handler is back, so the second one interrupts wherever the run is."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        import signal
        import threading

        self.requested = False
        self._on_event = on_event
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._on_event({"event": "status", "message": "Ctrl-C: saving a checkpoint after this step "
                                                      "(Ctrl-C again to quit at once)"})

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

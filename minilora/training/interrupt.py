"""Ctrl-C during training: the optimizer step in flight finishes, then the run stops.

A KeyboardInterrupt raised in the middle of a step can leave the gradients half summed or the
optimizer half stepped; a checkpoint of that would not resume exactly. So while the loop runs,
the first Ctrl-C only asks to stop: the loop finishes its step, writes a checkpoint at that step
and raises KeyboardInterrupt itself. A second Ctrl-C stops at once (the last checkpoint is then
the one kept).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType


class StopAfterStep:
    """A context in which the first SIGINT is noted (``requested``) instead of raised.

    It changes nothing off the main thread (only that one may set a signal handler) or where
    SIGINT already has a handler other than Python's default one (an embedding program's).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self._enabled = enabled
        self._previous: object = None

    def __enter__(self) -> StopAfterStep:
        if (self._enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nminilora: stopping after this step to save it (Ctrl-C again stops at once)",
              file=sys.stderr)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._previous = None

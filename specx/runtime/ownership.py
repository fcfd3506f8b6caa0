"""Who may drive a Generator's sessions (their KV caches are state): one generation at a time.

Across threads, generations queue: a second thread's generation waits until the one running ends (its stream read to
the end, closed, or garbage-collected). Within one thread a generation cannot wait for a stream that only that thread
can advance, so a new generation supersedes a stream left open: the old stream raises StreamInterruptedError when
read again, and never touches the caches after that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from specx.errors import StreamInterruptedError


@dataclass(eq=False)
class Claim:
    """One generation's hold on the sessions."""

    thread: int = field(default_factory=threading.get_ident)
    superseded: bool = False

    def check(self) -> None:
        """Raise if a newer generation in this claim's thread took the sessions over."""
        if self.superseded:
            raise StreamInterruptedError(
                "this stream was interrupted: another generation started on the same Generator in this thread before "
                "the stream was read to its end; read (or close()) a stream before starting the next, or load one "
                "Generator per concurrent stream")


class SessionGuard:
    """Serialises generations across threads; in the holder's own thread, a new claim supersedes the open one."""

    def __init__(self) -> None:
        self._turn = threading.Lock()  # held by the running generation
        self._state = threading.Lock()  # guards _holder
        self._holder: Claim | None = None

    def claim(self) -> Claim:
        """Wait for the sessions (or take them from this thread's own open stream)."""
        mine = Claim()
        with self._state:
            held = self._holder
            if held is not None and held.thread == mine.thread:
                held.superseded = True
                self._holder = mine
                return mine
        self._turn.acquire()
        with self._state:
            self._holder = mine
        return mine

    def release(self, claim: Claim) -> None:
        """End ``claim``: the next waiting generation runs (nothing to do for a superseded claim)."""
        with self._state:
            if self._holder is not claim:
                return
            self._holder = None
        self._turn.release()

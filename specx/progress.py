"""Progress of long work (export steps, validation, n-gram sampling, train-draft phases, bench --tune), told the way
the output can show it: on a terminal a live display (a spinner per phase, a bar with a count and ETA), otherwise
plain lines a log keeps: one when a phase starts, one when it ends, and one every ``PERIODIC_SECONDS`` while it runs
(phase, done/total, rate, ETA).

    progress = terminal_progress()           # picks by whether stderr is a terminal
    with progress.phase("building the graph"):
        ...
    bar = progress.bar("training the draft (steps)", total)
    bar.update(1)
    bar.close()

Work takes ``progress.phase`` and ``progress.bar`` as plain callables (``Phase``, ``Bars``), so it needs neither rich
nor a terminal; NO_PROGRESS reports nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Protocol, TextIO

PERIODIC_SECONDS = 30.0  # a line per running phase at least this often, in a log
HEARTBEAT_POLL_SECONDS = 5.0  # how often the heartbeat thread looks for phases due a line (no counts to trigger it)
LINE_PREFIX = "[specx]"


class Bar(Protocol):
    """A counted phase: ``update(n)`` as work is done, ``close()`` at its end."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


Phase = Callable[[str], ContextManager[None]]  # name -> a context that spans the phase
Bars = Callable[[str, int], Bar]  # (name, total) -> a bar


class Progress(Protocol):
    def phase(self, name: str) -> ContextManager[None]: ...

    def bar(self, name: str, total: int) -> Bar: ...


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _NoProgress:
    """Reports nothing (the Python API's default)."""

    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def bar(self, name: str, total: int) -> Bar:
        return _NullBar()


NO_PROGRESS: Progress = _NoProgress()


# -- plain lines ------------------------------------------------------------------------------------------------
@dataclass
class _Task:
    name: str
    total: int | None  # None: a phase without a count
    started: float
    last_line: float
    done: int = 0
    closed: bool = field(default=False)


class LineProgress:
    """Plain lines on ``stream``: a phase's start and end, and a line every ``interval`` seconds while it runs.

    ``clock`` (seconds, monotonic) is injectable so that tests advance time instead of sleeping; ``heartbeat``
    starts a thread that gives count-less phases their periodic line (tests call ``tick()`` themselves)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic,
                 interval: float = PERIODIC_SECONDS, heartbeat: bool = True):
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.heartbeat = heartbeat
        self._tasks: list[_Task] = []
        self._lock = threading.RLock()
        self._stop: threading.Event | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        task = self._start(name, None)
        try:
            yield
        except BaseException:
            self._end(task, failed=True)
            raise
        self._end(task)

    def bar(self, name: str, total: int) -> Bar:
        return _LineBar(self, self._start(name, total))

    def tick(self) -> None:
        """A line for every running phase whose last line is ``interval`` seconds old."""
        with self._lock:
            now = self.clock()
            for task in self._tasks:
                if now - task.last_line >= self.interval:
                    self._emit(f"{task.name}: {_running(task, now)}")
                    task.last_line = now

    # -- internals ---------------------------------------------------------------------------------------------
    def _start(self, name: str, total: int | None) -> _Task:
        with self._lock:
            now = self.clock()
            task = _Task(name, total, now, now)
            self._tasks.append(task)
            self._emit(f"{name}: started" + (f" (0/{total:,})" if total is not None else ""))
            self._start_heartbeat()
            return task

    def _advance(self, task: _Task, n: int) -> None:
        with self._lock:
            task.done += n
        self.tick()

    def _end(self, task: _Task, failed: bool = False) -> None:
        with self._lock:
            if task.closed:
                return
            task.closed = True
            self._tasks.remove(task)
            elapsed = self.clock() - task.started
            if failed:
                self._emit(f"{task.name}: failed after {_duration(elapsed)}")
            elif task.total is None:
                self._emit(f"{task.name}: done in {_duration(elapsed)}")
            else:
                self._emit(f"{task.name}: done, {task.done:,}/{task.total:,} in {_duration(elapsed)}"
                           f"{_rate(task.done, elapsed)}")
            if not self._tasks:
                self._stop_heartbeat()

    def _emit(self, text: str) -> None:
        self.stream.write(f"{LINE_PREFIX} {text}\n")
        self.stream.flush()

    def _start_heartbeat(self) -> None:
        if not self.heartbeat or self._stop is not None:
            return
        stop = self._stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_POLL_SECONDS):
                self.tick()

        threading.Thread(target=beat, name="specx-progress", daemon=True).start()

    def _stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None


class _LineBar:
    def __init__(self, owner: LineProgress, task: _Task):
        self._owner = owner
        self._task = task

    def update(self, n: int = 1) -> None:
        self._owner._advance(self._task, n)

    def close(self) -> None:
        self._owner._end(self._task)


def _running(task: _Task, now: float) -> str:
    elapsed = now - task.started
    if task.total is None:
        return f"running, {_duration(elapsed)} elapsed"
    share = f" ({task.done / task.total:.0%})" if task.total else ""
    rate = task.done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {_duration((task.total - task.done) / rate)}" if rate > 0 and task.done < task.total else ""
    return f"{task.done:,}/{task.total:,}{share}{_rate(task.done, elapsed)}{eta}, {_duration(elapsed)} elapsed"


def _rate(done: int, seconds: float) -> str:
    if seconds <= 0 or done <= 0:
        return ""
    rate = done / seconds
    return f", {rate:,.1f}/s" if rate < 100 else f", {rate:,.0f}/s"


def _duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# -- a terminal -------------------------------------------------------------------------------------------------
class RichProgress:
    """A spinner per phase (then a 'done' line) and a bar with count, elapsed time and ETA (rich, on stderr)."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console

        self.console = Console(file=stream, stderr=stream is None)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self.console.status(f"{name}..."):
            yield
        self.console.print(f"[green]done[/green] {name}")

    def bar(self, name: str, total: int) -> Bar:
        return _RichBar(self.console, name, total)


class _RichBar:
    def __init__(self, console, name: str, total: int):  # noqa: ANN001  (a rich Console: rich loads lazily)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichDisplay, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._display = RichDisplay(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
        self._task = self._display.add_task(name, total=total)
        self._display.start()

    def update(self, n: int = 1) -> None:
        self._display.advance(self._task, n)

    def close(self) -> None:
        self._display.stop()


def terminal_progress(stream: TextIO | None = None) -> Progress:
    """Progress on ``stream`` (default: stderr as it is now): a live display on a terminal, plain lines otherwise."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return RichProgress(stream)
    return LineProgress(stream)

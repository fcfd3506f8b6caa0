"""Progress: plain lines when the output is not a terminal (phase start and end, a line every ~30 s while running),
a live display when it is; the commands' long work reports through it."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest

from specx.progress import LINE_PREFIX, PERIODIC_SECONDS, LineProgress, RichProgress, terminal_progress
from tests.test_cli import _ok


class Clock:
    """A clock the test advances: no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _lines(stream: io.StringIO) -> list[str]:
    return [line.removeprefix(LINE_PREFIX + " ") for line in stream.getvalue().splitlines()]


@pytest.fixture()
def lines_and_clock() -> tuple[LineProgress, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    return LineProgress(stream, clock=clock, heartbeat=False), stream, clock


def test_a_phase_is_a_start_line_and_an_end_line(lines_and_clock):
    progress, stream, clock = lines_and_clock
    with progress.phase("building the target graph"):
        clock.advance(12.34)
    assert _lines(stream) == ["building the target graph: started", "building the target graph: done in 12.3s"]


def test_a_failed_phase_says_so(lines_and_clock):
    progress, stream, clock = lines_and_clock
    with pytest.raises(RuntimeError), progress.phase("validating"):
        clock.advance(75)
        raise RuntimeError("broken")
    assert _lines(stream)[-1] == "validating: failed after 1m15s"


def test_a_bar_reports_every_interval_with_rate_and_eta(lines_and_clock):
    progress, stream, clock = lines_and_clock
    bar = progress.bar("training the draft (steps)", 1000)
    assert _lines(stream) == ["training the draft (steps): started (0/1,000)"]
    for _ in range(10):  # 10 steps of 2 s: within the interval, no line
        clock.advance(2)
        bar.update(10)
    assert len(_lines(stream)) == 1
    clock.advance(PERIODIC_SECONDS - 20)
    bar.update(200)  # 300 done after 30 s: 10/s, 70 s left
    assert _lines(stream)[-1] == "training the draft (steps): 300/1,000 (30%), 10.0/s, ETA 1m10s, 30.0s elapsed"
    clock.advance(5)
    bar.update(50)
    assert len(_lines(stream)) == 2  # the next line waits for the next interval
    clock.advance(65)
    bar.update(650)
    bar.close()
    bar.close()  # closing twice says nothing twice
    assert _lines(stream)[2:] == ["training the draft (steps): 1,000/1,000 (100%), 10.0/s, 1m40s elapsed",
                                  "training the draft (steps): done, 1,000/1,000 in 1m40s, 10.0/s"]


def test_a_phase_without_a_count_reports_while_running(lines_and_clock):
    """The heartbeat's tick: a long step with no count (loading, validating) is not silent in a log."""
    progress, stream, clock = lines_and_clock
    with progress.phase("loading the target"):
        clock.advance(10)
        progress.tick()
        assert len(_lines(stream)) == 1
        clock.advance(PERIODIC_SECONDS)
        progress.tick()
        progress.tick()  # once per interval
        assert _lines(stream)[1:] == ["loading the target: running, 40.0s elapsed"]
        clock.advance(3600)
    assert _lines(stream)[-1] == "loading the target: done in 1h00m"


def test_the_heartbeat_stops_with_the_last_phase():
    stream = io.StringIO()
    progress = LineProgress(stream)
    with progress.phase("one"):
        assert progress._stop is not None
    assert progress._stop is None


def test_a_terminal_gets_the_live_display_and_a_log_the_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(terminal_progress(io.StringIO()), LineProgress)
    assert isinstance(terminal_progress(Terminal()), RichProgress)


# -- the commands, redirected (CliRunner's output is not a terminal) --------------------------------------------------
def _phase_lines(output: str) -> list[str]:
    return [line.removeprefix(LINE_PREFIX + " ") for line in output.splitlines() if line.startswith(LINE_PREFIX)]


def _starts_and_ends(lines: list[str]) -> tuple[list[str], list[str]]:
    starts = [re.sub(r": started.*", "", line) for line in lines if ": started" in line]
    ends = [re.sub(r": done.*", "", line) for line in lines if ": done" in line]
    return starts, ends


def test_export_and_train_draft_report_phases_in_a_log(llama_dir: Path, tmp_path: Path):
    out = tmp_path / "bundle"
    exported = _phase_lines(_ok(["export", str(llama_dir), "--draft", "none", "--output", str(out), "--dtype", "fp32",
                                 "--ngram-tokens", "64"]).stderr)
    starts, ends = _starts_and_ends(exported)
    assert starts == ends and len(starts) >= 4, exported  # every phase that started ended
    assert any(s.startswith("validating the target graph") for s in starts)
    assert any("writing text for the n-gram table" in line and "started (0/64)" in line for line in exported)
    trained = _phase_lines(_ok(["train-draft", str(out), "--tokens", "800", "--epochs", "1", "--draft-vocab", "100",
                                "--no-cache"]).stderr)
    starts, ends = _starts_and_ends(trained)
    assert starts == ends, trained
    assert any(s.startswith("loading the target") for s in starts)
    assert any(line.startswith("training the draft (steps): done, ") for line in trained), trained


def test_bench_tune_reports_progress_in_a_log(llama_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(llama_bundle, copy)
    result = _ok(["bench", str(copy), "--tune", "--limit", "1", "--temperatures", "0", "--max-new-tokens", "2"])
    lines = _phase_lines(result.stderr)
    assert lines[0].startswith("tuning greedy decoding (generations): started (0/")
    total = int(re.search(r"\(0/(\d+)\)", lines[0]).group(1))
    assert lines[-1].startswith(f"tuning greedy decoding (generations): done, {total}/{total} in ")

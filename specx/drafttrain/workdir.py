"""The work directory of `specx train-draft`: each phase's output in shards, with a manifest of what made it, so that
a run killed at any moment (any process of a job) continues where it stopped and ends with the same draft.

    WORK/lock                          held (flock) by the job's main process: one job at a time in a directory
    WORK/texts/manifest.json           what made the phase (its identity), the precision it chose, which processes
    WORK/texts/shard-00000/            tokens.npy, lengths.npy: one generation batch of the target's own text
    WORK/labels/manifest.json
    WORK/labels/shard-00000/           tokens.npy, lengths.npy, features.npy, top_ids.npy, top_probs.npy
    WORK/train/manifest.json           what the training is; its log once complete
    WORK/train/checkpoint.safetensors  draft, optimizer, scheduler, data position, RNG states (replaced atomically)
    WORK/train/draft.safetensors       the trained draft
    WORK/graphs/manifest.json          written once the bundle holds the draft

A shard is written into a hidden folder and renamed into place: it exists whole or not at all. A phase whose
manifest records another identity (other target weights, budget, seed, recipe...) is removed before it starts
again. Data shards are .npy, memory-mapped by the processes that read them (one copy in the page cache however many
processes train); checkpoints are safetensors. Nothing is pickled.

Two environment variables serve the tests: SPECX_TRAIN_TRACE (a file: one line "phase index rank" per shard or
checkpoint written) and SPECX_TRAIN_CRASH_AT ("phase:index" or "phase:index@rank": the process kills itself with
SIGKILL right after that shard, checkpoint or training step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from specx.errors import SpecxError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one job per work directory is then up to the user
    fcntl = None

MANIFEST = "manifest.json"
LOCK = "lock"
TRACE_ENV = "SPECX_TRAIN_TRACE"
CRASH_ENV = "SPECX_TRAIN_CRASH_AT"
_PARTIAL = ".partial-"


class DiskSpaceError(SpecxError):
    """The work directory's disk cannot hold what the run will write."""


class WorkDirBusyError(SpecxError):
    """Another train-draft job holds the work directory."""


def digest(value: object) -> str:
    """A short stable hash of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, value: object) -> None:
    """Atomically: a reader (or a killed writer's successor) sees the old file or the new one, never a part."""
    partial = path.with_name(f".{path.name}{_PARTIAL}{os.getpid()}")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def replace_durably(partial: Path, final: Path) -> None:
    """``partial`` (a file or a folder of files) flushed to the disk, then renamed to ``final`` in one step."""
    for item in ([partial] if partial.is_file() else sorted(partial.iterdir())):
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(partial, final)


@dataclass(frozen=True)
class Phase:
    """One phase's folder. ``identity`` (JSON) is what makes its output: the same identity, the same output."""

    root: Path
    identity: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def digest(self) -> str:
        return digest(self.identity)

    def record(self) -> dict | None:
        """The manifest, or None when there is none."""
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except FileNotFoundError:
            return None

    def matching_record(self) -> dict | None:
        """The manifest when it was written for this identity, else None."""
        record = self.record()
        return record if record is not None and record.get("digest") == self.digest else None

    def start(self, choices: Callable[[], dict], world_size: int) -> dict:
        """(The main process.) This identity's manifest: an existing one is kept with the choices it recorded
        (precision measured by the run that started the phase), else the folder is emptied and a manifest written
        with ``choices()``. Leftovers of writers killed mid-shard are removed."""
        record = self.matching_record()
        if record is None:
            self.remove()
            self.root.mkdir(parents=True)
            record = {"phase": self.name, "digest": self.digest, "identity": self.identity, **choices(),
                      "world_sizes": []}
        for leftover in self.root.glob(f".*{_PARTIAL}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        if record["world_sizes"][-1:] != [world_size]:  # every job size that worked on the phase, in order
            record["world_sizes"].append(world_size)
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        write_json(self.root / MANIFEST, record)

    def remove(self) -> None:
        """The manifest first: a removal cut short leaves no manifest that vouches for what is left."""
        (self.root / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def complete(self, record: dict | None) -> bool:
        """Whether ``record`` says the phase ended and its shards are all in place."""
        return bool(record and record.get("complete") and all(self.has(i) for i in range(record.get("shards", 0))))

    def shard(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}"

    def has(self, index: int) -> bool:
        return self.shard(index).is_dir()

    def save_shard(self, index: int, arrays: dict[str, np.ndarray], rank: int) -> None:
        final = self.shard(index)
        partial = self.root / f".{final.name}{_PARTIAL}{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name, array in arrays.items():
            np.save(partial / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        replace_durably(partial, final)
        written(self.name, index, rank)

    def load_shard(self, index: int, mmap: bool = False) -> dict[str, np.ndarray]:
        return {path.stem: np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
                for path in sorted(self.shard(index).glob("*.npy"))}

    def size(self) -> int:
        """Bytes the phase holds on disk."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0


@contextlib.contextmanager
def locked(work: Path) -> Iterator[None]:
    """Hold the work directory for this job (released when the process ends, however it ends)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / LOCK, "a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkDirBusyError(f"another train-draft job is using {work}; wait for it to end, or pass "
                                       "another --work-dir") from None
        yield


# -- disk -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskUse:
    """What the run will hold in its work directory, stated before it starts."""

    per_token: int  # bytes per token of training data (texts + labels)
    tokens: int  # tokens the data phases will write at most
    checkpoint: int  # bytes of the training checkpoint and the trained draft
    present: int  # bytes already in the work directory (an earlier run's, reused or replaced)
    free: int  # bytes free on its disk

    @property
    def total(self) -> int:
        return self.per_token * self.tokens + self.checkpoint

    @property
    def needed(self) -> int:
        return max(0, self.total - self.present)

    def describe(self) -> str:
        return (f"{_gb(self.total)} ({self.per_token:,} bytes per token x {self.tokens:,} tokens + "
                f"{_gb(self.checkpoint)} of checkpoints), {_gb(self.needed)} more than it holds, {_gb(self.free)} free")


def disk_use(work: Path, per_token: int, tokens: int, checkpoint: int, phases: list[Phase]) -> DiskUse:
    free = shutil.disk_usage(_existing(work)).free
    return DiskUse(per_token, tokens, checkpoint, sum(p.size() for p in phases), free)


def check_disk(work: Path, use: DiskUse) -> None:
    if use.needed > use.free:
        raise DiskSpaceError(f"the work directory {work} needs {_gb(use.needed)} more ({use.per_token:,} bytes per "
                             f"token x {use.tokens:,} tokens + {_gb(use.checkpoint)} of checkpoints) and its disk "
                             f"has {_gb(use.free)} free; free some space, lower --tokens, or pass --work-dir on a "
                             "larger disk")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


# -- test hooks -------------------------------------------------------------------------------------------------
def written(phase: str, index: int, rank: int) -> None:
    """A shard or checkpoint is in place: traced, and a crash point."""
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a") as handle:
            handle.write(f"{phase} {index} {rank}\n")
    crash_point(phase, index, rank)


def crash_point(phase: str, index: int, rank: int) -> None:
    """Die here (SIGKILL: no cleanup, as a killed job) when SPECX_TRAIN_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) in (f"{phase}:{index}", f"{phase}:{index}@{rank}"):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))

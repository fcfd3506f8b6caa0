"""Putting a finished bundle in place, recoverably, and replacing only what is specx's.

A bundle is built in a hidden sibling folder (``.NAME.partial-PID``, train-draft's ``.NAME.train-PID``), then::

    staging -> .NAME.ready-PID      finished: from here on the swap is completed, never lost
    NAME    -> .NAME.old-PID        the bundle it replaces, if any
    .NAME.ready-PID -> NAME
    .NAME.old-PID removed

A process killed anywhere in between leaves these folders with the PID of a process that no longer runs; the next
export of NAME or load of NAME (``recover``) completes the swap (a ready folder and no NAME), puts the old bundle back
(an old folder and nothing ready) and removes what is left. Folders of a process that still runs are never touched.
The PID check assumes one machine uses the directory (not a network share written from several hosts).

A directory is replaced only when its manifest.json is specx's (``is_specx_manifest``) and everything in it is a file
that manifest names: any other file stops the export before it starts, so nothing specx did not write is deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from specx.errors import InvalidArgumentError
from specx.runtime.manifest import MANIFEST_FILE, is_specx_manifest

STAGING, TRAINING, READY, OLD = "partial", "train", "ready", "old"
_SIBLING = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{STAGING}|{TRAINING}|{READY}|{OLD})-(?P<pid>[0-9]+)$")
_MANIFEST_PARTIAL = re.compile(rf"^\.{re.escape(MANIFEST_FILE)}\.[0-9]+\.partial$")  # Manifest.write's temporary file
_LISTED = 5  # foreign names an error message lists


def sibling(output: Path, kind: str) -> Path:
    """This process's hidden folder of ``kind`` beside ``output``."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}"


def recover(output: Path) -> None:
    """Complete or undo a swap into ``output`` that a dead process left half done, and remove its leftover folders."""
    if not output.parent.is_dir():
        return
    stale = sorted(((kind, path) for kind, pid, path in _siblings(output) if not _alive(pid)),
                   key=lambda item: _mtime(item[1]))
    if not os.path.lexists(output):
        for kind in (READY, OLD):  # a finished new bundle first, else the old one back
            candidates = [path for k, path in stale if k == kind]
            if candidates and _move(candidates[-1], output):
                break
    for _, path in stale:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def check_replaceable(output: Path) -> None:
    """Refuse (InvalidArgumentError) an ``output`` that is not a directory specx may replace: a file, a non-empty
    directory without specx's manifest, or a bundle holding entries its manifest does not name."""
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise InvalidArgumentError(f"output {output} exists and is not a directory; pass another --output")
    entries = sorted(entry.name for entry in output.iterdir())
    if not entries:
        return
    manifest = _specx_manifest(output)
    if manifest is None:
        raise InvalidArgumentError(f"output {output} is a non-empty directory that is not a specx bundle (no "
                                   f"{MANIFEST_FILE} written by specx); specx replaces only its own bundles: pass "
                                   "another --output, or empty the directory")
    owned = owned_names(manifest)
    foreign = [name for name in entries if name not in owned and not _MANIFEST_PARTIAL.match(name)]
    if foreign:
        listed = ", ".join(foreign[:_LISTED]) + (f" and {len(foreign) - _LISTED} more" if len(foreign) > _LISTED else "")
        raise InvalidArgumentError(f"output {output} is a specx bundle that also holds {listed}, which specx did not "
                                   "write and would delete; move them out of the bundle, or pass another --output")


def replace_bundle(staging: Path, output: Path) -> None:
    """Move the finished bundle in ``staging`` to ``output``, replacing the bundle there (checked replaceable)."""
    check_replaceable(output)
    ready = sibling(output, READY)
    staging.rename(ready)
    old = sibling(output, OLD) if os.path.lexists(output) else None
    try:
        if old is not None:
            output.rename(old)
        ready.rename(output)
    except OSError:
        if old is not None and not os.path.lexists(output) and old.exists():
            old.rename(output)
        shutil.rmtree(ready, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def owned_names(manifest: dict[str, Any]) -> set[str]:
    """The top-level names a specx manifest accounts for: its file records, or (bundles written before records
    existed) the files its entries name and their graphs' ``.data`` files."""
    names = {MANIFEST_FILE}
    files = manifest.get("files")
    if isinstance(files, dict):
        names |= set(files)
    for key in ("target", "draft"):
        entry = manifest.get(key)
        if isinstance(entry, dict):
            graphs = [entry.get("graph"), entry.get("kv_commit")]
            names |= {*graphs, *(f"{g}.data" for g in graphs if isinstance(g, str)), entry.get("vocab_map")}
    for key in ("tokenizer", "ngram"):
        entry = manifest.get(key)
        if isinstance(entry, dict):
            names.add(entry.get("file"))
    return {name for name in names if isinstance(name, str) and name and "/" not in name and "\\" not in name}


def _specx_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if is_specx_manifest(manifest) else None


def _siblings(output: Path) -> list[tuple[str, int, Path]]:
    found = []
    try:
        paths = list(output.parent.iterdir())
    except OSError:  # an unreadable parent: nothing to recover from here
        return []
    for path in paths:
        match = _SIBLING.match(path.name)
        if match and match["name"] == output.name and path.is_dir() and not path.is_symlink():
            found.append((match["kind"], int(match["pid"]), path))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on Windows, where signal 0 would end it, every process counts as running)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number no process has: leave its folder alone
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another process meanwhile
        return 0.0


def _move(source: Path, output: Path) -> bool:
    try:
        source.rename(output)
    except OSError:  # another process recovered it first, or the name is taken now
        return False
    return True

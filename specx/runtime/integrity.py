"""A bundle's files: every path the manifest (or a graph, for its external data) names must stay inside the bundle,
and every file the exporter wrote is recorded in the manifest and checked.

    export           ``files``: name -> size, sha256 of the whole file, spot digest (a few blocks at fixed offsets)
    every load       paths inside the bundle (symlinks resolved); each recorded file present, of its recorded size
                     and spot digest: catches a truncated, replaced or overwritten file for ~16 reads of 4 KiB per file,
                     not a single changed byte inside it
    info --verify    the sha256 of every recorded file: about 0.36 s per 500 MB on a 2-core AMD EPYC (SHA extensions,
                     page cache warm), reading from disk on top; too much to pay on every load of a multi-GB bundle
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from specx.errors import BundleError
from specx.runtime.manifest import FileRecord, Manifest
from specx.runtime.onnx_proto import initializers

SPOT_BLOCKS = 16  # blocks the spot digest reads, spread evenly over the file (first and last included)
SPOT_BLOCK_BYTES = 4096
CHUNK_BYTES = 1 << 20
GRAPH_SUFFIX = ".onnx"


@dataclass(frozen=True)
class Verified:
    files: int
    bytes: int
    seconds: float


def inside(bundle_dir: Path, name: str) -> Path:
    """``bundle_dir / name``, provided ``name`` is a relative path that stays inside the bundle once symlinks are
    resolved; otherwise a BundleError (a manifest or graph that points elsewhere is refused, never opened)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise BundleError(f"{bundle_dir}: the manifest names a file {name!r}; re-export the bundle")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise BundleError(f"{bundle_dir}: {name!r} lies outside the bundle (absolute, or climbing out with '..'); "
                          "specx opens only files inside the bundle: re-export it")
    root = bundle_dir.resolve()
    path = (bundle_dir / pure).resolve()
    if path == root or not path.is_relative_to(root):
        raise BundleError(f"{bundle_dir}: {name!r} resolves to {path}, outside the bundle; specx opens only files "
                          "inside the bundle: replace the link with the file, or re-export the bundle")
    return bundle_dir / pure


def referenced_files(bundle_dir: Path, manifest: Manifest) -> list[str]:
    """Every file the bundle needs: what the manifest names, and the external-data files its graphs name (each
    checked to lie inside the bundle)."""
    names = list(dict.fromkeys(manifest.named_files()))
    for name in names:
        inside(bundle_dir, name)
    for name in [n for n in names if n.endswith(GRAPH_SUFFIX)]:
        parent = PurePosixPath(name).parent
        for tensor in initializers(_present(bundle_dir, name)).values():
            if tensor.location is not None:
                data = str(parent / tensor.location) if str(parent) != "." else tensor.location
                inside(bundle_dir, data)
                names.append(data)
    return list(dict.fromkeys(names))


def record_files(bundle_dir: Path, manifest: Manifest) -> dict[str, FileRecord]:
    """The records of every file the bundle needs (the exporter and train-draft write them into the manifest)."""
    return {name: _record(inside(bundle_dir, name)) for name in sorted(referenced_files(bundle_dir, manifest))}


def check_files(bundle_dir: Path, manifest: Manifest) -> None:
    """At every load: each file the bundle needs is inside it and present; recorded ones have their recorded size and
    spot digest."""
    needed = referenced_files(bundle_dir, manifest)
    records = manifest.files
    if records is not None:
        unrecorded = [name for name in needed if name not in records]
        if unrecorded:
            raise BundleError(f"{bundle_dir}: {', '.join(unrecorded)} is named but not among the files the bundle "
                              "recorded at export; re-export the bundle with `specx export`")
    for name in sorted(set(needed) | set(records or {})):
        path = _present(bundle_dir, name)
        if records is not None and name in records:
            _check_record(path, name, records[name])


def verify_files(bundle_dir: Path, manifest: Manifest) -> Verified:
    """The full check (`specx info --verify`): the sha256 of every recorded file."""
    if manifest.files is None:
        raise BundleError(f"{bundle_dir} records no file hashes (exported before specx recorded them); re-export it "
                          "with `specx export` to verify it")
    check_files(bundle_dir, manifest)
    start, total = time.perf_counter(), 0
    for name, record in sorted(manifest.files.items()):
        if _sha256(inside(bundle_dir, name)) != record.sha256:
            raise BundleError(f"{bundle_dir}: {name} differs from what was exported (sha256 mismatch); the file is "
                              "damaged or was changed: re-export the bundle with `specx export`")
        total += record.size
    return Verified(files=len(manifest.files), bytes=total, seconds=time.perf_counter() - start)


def _present(bundle_dir: Path, name: str) -> Path:
    path = inside(bundle_dir, name)
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} is incomplete: {name} is missing; re-export it with `specx export`")
    return path


def _check_record(path: Path, name: str, record: FileRecord) -> None:
    size = path.stat().st_size
    if size != record.size:
        raise BundleError(f"{path.parent}: {name} is {size} bytes, the manifest recorded {record.size}; the file is "
                          "truncated or was changed: re-export the bundle with `specx export`")
    if _spot(path, size) != record.spot:
        raise BundleError(f"{path.parent}: {name} differs from what was exported (spot check); the file is damaged "
                          "or was changed: re-export the bundle with `specx export`")


def _record(path: Path) -> FileRecord:
    size = path.stat().st_size
    return FileRecord(size=size, sha256=_sha256(path), spot=_spot(path, size))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _spot(path: Path, size: int) -> str:
    """sha256 of the size and SPOT_BLOCKS blocks at evenly spaced offsets (the whole file when that is smaller)."""
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in _spot_offsets(size):
            f.seek(offset)
            digest.update(f.read(SPOT_BLOCK_BYTES))
    return digest.hexdigest()


def _spot_offsets(size: int) -> Iterable[int]:
    if size <= SPOT_BLOCKS * SPOT_BLOCK_BYTES:
        return range(0, size, SPOT_BLOCK_BYTES)
    last = size - SPOT_BLOCK_BYTES
    return (last * i // (SPOT_BLOCKS - 1) for i in range(SPOT_BLOCKS))

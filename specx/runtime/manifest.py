"""The bundle manifest: one JSON file that says what a bundle holds. Written by the exporter, read by the runtime.

Bundle layout::

    <bundle>/manifest.json
             target.onnx (+ target.onnx.data)     decoder graph, see specx.graphs.contract
             target.kv_commit.onnx                helper graph that moves accepted KV rows into place
             draft.onnx, draft.kv_commit.onnx     when the bundle has a draft
             draft_vocab.npy                      a trained feature draft's vocabulary map
             ngram.npz                            Katz trigram table (draft2), when built
             tokenizer.json

The manifest marks itself (``"format": "specx-bundle"`` and ``format_version``) so that a directory is replaced only
when it is a specx bundle, and records every file the bundle holds (``files``: size, sha256, spot digest; checked by
``specx.runtime.integrity``). Bundles written before the marker and the records existed are read as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specx.errors import BundleError
from specx.graphs.architecture import ArchitectureSpec
from specx.graphs.precision import DTYPES  # noqa: F401  (re-exported: what a manifest's dtype may be)
from specx.graphs.contract import FEATURE_DRAFT, GraphContract

FORMAT_VERSION = 2
BUNDLE_FORMAT = "specx-bundle"  # the manifest's "format": what tells a specx bundle from any other manifest.json
MANIFEST_FILE = "manifest.json"
TUNING_KEYS = ("greedy", "sampling")
TUNED_MODES = ("autoregressive", "speculative", "staged", "ngram")
DRAFT_CHOICES = ("top", "sample")


@dataclass(frozen=True)
class ModelEntry:
    role: str  # "target" | "draft"
    source: str  # what the user passed to `specx export`
    graph: str  # file name inside the bundle
    kv_commit: str
    architecture: ArchitectureSpec
    contract: GraphContract
    weight_bytes: int  # bytes of initializers, what one forward pass reads
    parity: dict[str, float] = field(default_factory=dict)  # max_abs_logit_diff, tolerance
    derived_from: str | None = None  # e.g. "self:layers=4" for drafts made from the target
    quantization: dict[str, Any] | None = None  # weight-only scheme: bits, block_size, accuracy_level, lm_head
    vocab_map: str | None = None  # feature draft: .npy file, draft vocabulary id -> target token id
    training: dict[str, Any] | None = None  # trained drafts: kind, data, seed, figures reached (specx train-draft)

    @property
    def is_feature_draft(self) -> bool:
        return self.contract.kind == FEATURE_DRAFT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["contract"] = self.contract.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelEntry":
        return cls(
            role=str(d["role"]),
            source=str(d["source"]),
            graph=str(d["graph"]),
            kv_commit=str(d["kv_commit"]),
            architecture=ArchitectureSpec.from_dict(d["architecture"]),
            contract=GraphContract.from_dict(d["contract"]),
            weight_bytes=int(d["weight_bytes"]),
            parity=dict(d.get("parity") or {}),
            derived_from=d.get("derived_from"),
            quantization=d.get("quantization"),
            vocab_map=d.get("vocab_map"),
            training=d.get("training"),
        )


@dataclass(frozen=True)
class TokenizerEntry:
    file: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    special_tokens: dict[str, str] = field(default_factory=dict)  # role -> token string, e.g. {"eos_token": "</s>"}
    chat_template: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizerEntry":
        return cls(
            file=str(d["file"]),
            vocab_size=int(d["vocab_size"]),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(t) for t in d.get("eos_token_ids") or ()),
            pad_token_id=d.get("pad_token_id"),
            special_tokens=dict(d.get("special_tokens") or {}),
            chat_template=d.get("chat_template"),
        )


@dataclass(frozen=True)
class NgramEntry:
    """The n-gram table (draft2 of staged decoding) and how it was built."""

    file: str
    info: dict[str, Any] = field(default_factory=dict)  # sampled_tokens, corpus_files, total_tokens, ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NgramEntry":
        return cls(file=str(d["file"]), info=dict(d.get("info") or {}))


@dataclass(frozen=True)
class FileRecord:
    """A file the bundle holds, as the exporter wrote it."""

    size: int  # bytes
    sha256: str  # of the whole file (`specx info --verify`)
    spot: str  # sha256 of a few blocks at fixed offsets (checked at every load; see specx.runtime.integrity)

    @classmethod
    def from_dict(cls, d: Any) -> "FileRecord":
        if not isinstance(d, dict):
            raise ValueError("a file record is not an object")
        size, sha256, spot = d.get("size"), d.get("sha256"), d.get("spot")
        if not _is_int(size) or size < 0 or not _is_hex(sha256) or not _is_hex(spot):
            raise ValueError(f"bad file record {d}")
        return cls(size=size, sha256=sha256, spot=spot)


@dataclass(frozen=True)
class Manifest:
    name: str
    dtype: str
    target: ModelEntry
    draft: ModelEntry | None
    tokenizer: TokenizerEntry
    specx_version: str
    created: str
    ngram: NgramEntry | None = None
    format_version: int = FORMAT_VERSION
    tuning: dict[str, Any] | None = None  # `specx bench --tune`: the default tree and mode measured fastest here
    files: dict[str, FileRecord] | None = None  # every file of the bundle; None in bundles exported before records

    def named_files(self) -> list[str]:
        """The files the manifest's entries name (graphs, KV-commit graphs, vocabulary map, tokenizer, n-gram table);
        the graphs' external-data files are named inside the graphs."""
        names = [self.tokenizer.file, *([self.ngram.file] if self.ngram else [])]
        for entry in filter(None, (self.target, self.draft)):
            names += [entry.graph, entry.kv_commit, *([entry.vocab_map] if entry.vocab_map else [])]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": self.format_version,
            "specx_version": self.specx_version,
            "name": self.name,
            "created": self.created,
            "dtype": self.dtype,
            "target": self.target.to_dict(),
            "draft": self.draft.to_dict() if self.draft else None,
            "tokenizer": asdict(self.tokenizer),
            "ngram": asdict(self.ngram) if self.ngram else None,
            "tuning": self.tuning,
            "files": {name: asdict(r) for name, r in self.files.items()} if self.files is not None else None,
        }

    def write(self, bundle_dir: Path) -> None:
        """Atomically: a reader sees the old manifest or the new one, never a part."""
        path = bundle_dir / MANIFEST_FILE
        partial = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(partial, path)

    @classmethod
    def read(cls, bundle_dir: Path) -> "Manifest":
        path = bundle_dir / MANIFEST_FILE
        if not bundle_dir.is_dir():
            raise BundleError(f"no bundle at {bundle_dir}: the directory does not exist; create one with `specx export`")
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a specx bundle (no {MANIFEST_FILE}); create one with `specx export`")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is corrupt ({exc}); re-export the bundle with `specx export`") from exc
        if not isinstance(d, dict):
            raise BundleError(f"{path} is corrupt (not a JSON object); re-export the bundle with `specx export`")
        if "format" in d and d["format"] != BUNDLE_FORMAT:
            raise BundleError(f"{bundle_dir} is not a specx bundle ({MANIFEST_FILE} says format {d['format']!r}); "
                              "create one with `specx export`")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"{path} has no valid format_version; re-export the bundle with `specx export`")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{bundle_dir} uses bundle format {version}, newer than this specx reads ({FORMAT_VERSION}); "
                "upgrade specx (pip install -U specx)"
            )
        if version < FORMAT_VERSION:
            raise BundleError(f"{bundle_dir} uses the old bundle format {version}; re-export it with `specx export`")
        try:
            manifest = cls(
                name=str(d["name"]),
                dtype=str(d["dtype"]),
                target=ModelEntry.from_dict(d["target"]),
                draft=ModelEntry.from_dict(d["draft"]) if d.get("draft") else None,
                tokenizer=TokenizerEntry.from_dict(d["tokenizer"]),
                specx_version=str(d.get("specx_version", "?")),
                created=str(d.get("created", "?")),
                ngram=NgramEntry.from_dict(d["ngram"]) if d.get("ngram") else None,
                format_version=version,
                tuning=d.get("tuning"),
                files=_files(d.get("files")),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path} is corrupt (missing or bad field {exc}); re-export the bundle") from exc
        if manifest.dtype not in DTYPES:
            raise BundleError(f"{path}: unknown dtype {manifest.dtype!r}; expected one of {', '.join(DTYPES)}")
        problem = tuning_problem(manifest.tuning)
        if problem:
            raise BundleError(f"{path}: the tuning record is malformed ({problem}); delete its \"tuning\" key, or "
                              "run `specx bench --tune` again")
        return manifest


def is_specx_manifest(d: Any) -> bool:
    """Whether a parsed manifest.json is specx's: the format marker, or (bundles written before the marker existed)
    an integer format_version with target and tokenizer entries."""
    if not isinstance(d, dict) or not _is_int(d.get("format_version")):
        return False
    if "format" in d:
        return d["format"] == BUNDLE_FORMAT
    return isinstance(d.get("target"), dict) and isinstance(d.get("tokenizer"), dict)


def tuning_problem(tuning: Any) -> str | None:
    """What is wrong with a manifest's `tuning` value ({"greedy"|"sampling": record}), or None."""
    if tuning is None:
        return None
    if not isinstance(tuning, dict):
        return "not an object"
    for key, record in tuning.items():
        if key not in TUNING_KEYS:
            return f"unknown key {key!r}, expected {' or '.join(TUNING_KEYS)}"
        problem = _record_problem(record) if isinstance(record, dict) else "not an object"
        if problem:
            return f"{key}: {problem}"
    return None


def _record_problem(record: dict[str, Any]) -> str | None:
    if record.get("mode") not in TUNED_MODES:
        return f"mode {record.get('mode')!r}, expected one of {', '.join(TUNED_MODES)}"
    if record.get("draft_choice", "top") not in DRAFT_CHOICES:
        return f"draft_choice {record['draft_choice']!r}, expected {' or '.join(DRAFT_CHOICES)}"
    for name in ("tree_budget", "tree_depth"):
        if name in record and not (_is_int(record[name]) and record[name] >= 0):
            return f"{name} {record[name]!r} is not a count"
    for name in ("tree_threshold", "tree_floor"):
        value = record.get(name)
        if value is not None and not (_is_number(value) and 0 <= value < 1):
            return f"{name} {value!r} does not lie in [0, 1)"
    if record.get("tree_budget") and not 1 <= record.get("tree_depth", 0) <= record["tree_budget"]:
        return f"tree_depth {record.get('tree_depth')!r} must lie in [1, tree_budget]"
    return None


def _files(d: Any) -> dict[str, FileRecord] | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not all(isinstance(name, str) for name in d):
        raise ValueError("files is not an object of file records")
    return {name: FileRecord.from_dict(record) for name, record in d.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

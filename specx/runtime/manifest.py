"""The bundle manifest: one JSON file that says what a bundle holds. Written by the exporter, read by the runtime.

Bundle layout::

    <bundle>/manifest.json
             target.onnx (+ target.onnx.data)     decoder graph, see specx.graphs.contract
             target.kv_commit.onnx                helper graph that moves accepted KV rows into place
             draft.onnx, draft.kv_commit.onnx     when the bundle has a draft
             draft_vocab.npy                      a trained feature draft's vocabulary map
             ngram.npz                            Katz trigram table (draft2), when built
             tokenizer.json
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specx.errors import BundleError
from specx.graphs.architecture import ArchitectureSpec
from specx.graphs.contract import FEATURE_DRAFT, GraphContract

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
DTYPES = ("fp32", "fp16", "int8", "int4")  # int8/int4: MatMulNBits weights, fp32 activations and KV


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

    def to_dict(self) -> dict[str, Any]:
        return {
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
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path} is corrupt (missing or bad field {exc}); re-export the bundle") from exc
        if manifest.dtype not in DTYPES:
            raise BundleError(f"{path}: unknown dtype {manifest.dtype!r}; expected one of {', '.join(DTYPES)}")
        return manifest

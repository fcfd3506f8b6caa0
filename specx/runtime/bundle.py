"""Loading and checking a bundle: manifest, its files (inside the bundle, as recorded), graph tables, tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from specx.errors import BundleError
from specx.runtime.integrity import check_files, inside
from specx.runtime.manifest import Manifest, ModelEntry
from specx.runtime.onnx_proto import initializers
from specx.runtime.swap import recover

DEFAULT_MODEL = "gpt2-large"
# The position tables a decoder graph reads (specx/graphs/decoder.py's initializer names): rotary cos/sin caches or
# learned position embeddings, max_positions rows each.
POSITION_TABLES = ("model.rotary.cos_cache", "model.rotary.sin_cache", "model.embed_positions.weight")


def specx_home() -> Path:
    """Where `specx export` writes bundles by default: $SPECX_HOME, else ~/.cache/specx."""
    return Path(os.environ.get("SPECX_HOME") or Path.home() / ".cache" / "specx").expanduser()


def bundle_name(source: str) -> str:
    """The bundle directory name for a model source: the last path component, without a .gguf suffix."""
    name = Path(source.rstrip("/")).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def resolve_bundle_dir(model: str) -> Path:
    """A --model value: a bundle directory, or a name under SPECX_HOME."""
    path = Path(model).expanduser()
    recover(path)  # a replacement an interrupted export left half done
    if path.is_dir():
        return path
    candidate = specx_home() / bundle_name(model)
    recover(candidate)
    if candidate.is_dir():
        return candidate
    raise BundleError(
        f"no bundle for {model!r} (looked in {path} and {candidate}); create it with `specx export {model}`"
    )


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    tokenizer: Tokenizer

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path).expanduser()
        recover(path)
        manifest = Manifest.read(path)
        check_files(path, manifest)
        for entry in filter(None, (manifest.target, manifest.draft)):
            _check_positions(path, entry)
        tokenizer = _load_tokenizer(path, manifest)
        _check_vocab(manifest, tokenizer)
        return cls(path=path, manifest=manifest, tokenizer=tokenizer)

    def graph_path(self, entry: ModelEntry) -> Path:
        return inside(self.path, entry.graph)

    def commit_path(self, entry: ModelEntry) -> Path:
        return inside(self.path, entry.kv_commit)


def _check_positions(path: Path, entry: ModelEntry) -> None:
    """The context the manifest gives a model must fit its graph's position tables (rows past them would crash the
    attention kernel or read out of range mid-generation)."""
    tables = initializers(inside(path, entry.graph))
    rows = [t.dims[0] for name, t in tables.items() if name in POSITION_TABLES and t.dims]
    context = entry.architecture.max_positions
    if rows and min(rows) < context:
        raise BundleError(f"bundle {path}: the manifest gives the {entry.role} a context of {context} positions but "
                          f"its graph {entry.graph} has position tables for {min(rows)}; re-export the bundle with "
                          "`specx export`")


def _load_tokenizer(path: Path, manifest: Manifest) -> Tokenizer:
    file = inside(path, manifest.tokenizer.file)
    if not file.is_file():
        raise BundleError(f"bundle {path} is incomplete: {manifest.tokenizer.file} is missing; re-export it")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise BundleError(f"{file} is not a valid tokenizer ({exc}); re-export the bundle") from exc


def _check_vocab(manifest: Manifest, tokenizer: Tokenizer) -> None:
    target_vocab = manifest.target.contract.vocab_size
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > target_vocab:
        raise BundleError(f"tokenizer has {size} tokens but the target's vocabulary is {target_vocab}; re-export the bundle")
    if manifest.draft and not manifest.draft.is_feature_draft and manifest.draft.contract.vocab_size != target_vocab:
        raise BundleError(
            f"draft vocabulary {manifest.draft.contract.vocab_size} differs from the target's {target_vocab}; "
            "re-export with a draft that shares the target's tokenizer"
        )
    special = manifest.tokenizer
    for token_id in (*special.eos_token_ids, special.bos_token_id, special.pad_token_id):
        if token_id is not None and not 0 <= token_id < target_vocab:
            raise BundleError(f"special token id {token_id} lies outside the vocabulary (0..{target_vocab - 1}); re-export")
    for role, text in special.special_tokens.items():
        if tokenizer.token_to_id(text) is None:
            raise BundleError(f"special token {role}={text!r} is not in the bundle's tokenizer; re-export the bundle")

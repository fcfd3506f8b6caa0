"""An architecture's figures, the sizes every graph is built from: normalised once from a Hugging Face config by the
exporter's adapter, recorded in the bundle manifest, read back by the runtime. Imports nothing but the standard
library, so that graphs/ and runtime/ both read it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchitectureSpec:
    """An architecture's figures, normalised once from its Hugging Face config by the exporter's adapter."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    position_encoding: str  # "learned" | "rope"
    tied_embeddings: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchitectureSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

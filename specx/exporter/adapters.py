"""Per-architecture differences, in small adapter classes registered by transformers ``model_type``.

Each adapter normalises a Hugging Face config once into an ``ArchitectureSpec`` (optimum's normalized configs supply
the common figures) and knows how its model's KV cache is built from and flattened to plain tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from optimum.utils import NormalizedConfigManager
from transformers import DynamicCache, PretrainedConfig

from specx.errors import UnsupportedModelError
from specx.runtime.manifest import ArchitectureSpec

_REGISTRY: dict[str, type["ArchitectureAdapter"]] = {}


def register(cls: type["ArchitectureAdapter"]) -> type["ArchitectureAdapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(config: PretrainedConfig) -> "ArchitectureAdapter":
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type or "")
    if cls is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        )
    return cls(config)


class ArchitectureAdapter:
    model_types: ClassVar[tuple[str, ...]] = ()
    position_encoding: ClassVar[str] = ""
    default_draft: ClassVar[str | None] = None  # hub id of the family's draft, if it has a standard one

    def __init__(self, config: PretrainedConfig):
        self.config = config
        self.spec = self._normalise(config)

    def _normalise(self, config: PretrainedConfig) -> ArchitectureSpec:
        norm = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        num_heads = int(norm.num_attention_heads)
        hidden = int(norm.hidden_size)
        return ArchitectureSpec(
            model_type=config.model_type,
            num_layers=int(norm.num_layers),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=self._num_kv_heads(norm, num_heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // num_heads),
            vocab_size=int(norm.vocab_size),
            max_positions=self._max_positions(config),
            position_encoding=self.position_encoding,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        )

    def _num_kv_heads(self, norm: Any, num_heads: int) -> int:
        return num_heads

    def _max_positions(self, config: PretrainedConfig) -> int:
        raise NotImplementedError

    # -- KV cache <-> flat tensors ---------------------------------------------------------------------------
    def make_cache(self, past: Sequence[torch.Tensor]) -> DynamicCache:
        """past = (k0, v0, k1, v1, ...), each (batch, kv_heads, past, head_dim)."""
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        return DynamicCache(pairs, config=self.config)

    def flatten_cache(self, cache: DynamicCache) -> list[torch.Tensor]:
        flat: list[torch.Tensor] = []
        for layer in cache.layers:
            flat += [layer.keys, layer.values]  # (batch, kv_heads, past+seq, head_dim) each
        return flat


@register
class GPT2Adapter(ArchitectureAdapter):
    """GPT-2 family: learned absolute positions, multi-head attention, tied embeddings."""

    model_types = ("gpt2",)
    position_encoding = "learned"
    default_draft = "distilgpt2"

    def _max_positions(self, config: PretrainedConfig) -> int:
        return int(config.n_positions)


@register
class LlamaAdapter(ArchitectureAdapter):
    """Llama family (SmolLM2, TinyLlama, Llama 2/3): RoPE, grouped-query attention, tied or untied head."""

    model_types = ("llama",)
    position_encoding = "rope"

    def _num_kv_heads(self, norm: Any, num_heads: int) -> int:
        return int(getattr(norm, "num_key_value_heads", None) or num_heads)

    def _max_positions(self, config: PretrainedConfig) -> int:
        return int(config.max_position_embeddings)

"""Per-architecture differences, in small adapter classes registered by transformers ``model_type``.

Each adapter normalises a Hugging Face config once into an ``ArchitectureSpec`` (optimum's normalized configs supply
the common figures) and a ``DecoderFamily`` (norm, activation), hands the graph builder its weights in the builder's
layout (``DecoderWeights``: x @ W matrices, q/k/v and gate/up packed), and knows how the PyTorch reference's KV cache
is built from and flattened to plain tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from optimum.utils import NormalizedConfigManager
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from specx.errors import UnsupportedModelError
from specx.graphs.decoder import DecoderFamily, DecoderWeights, LayerWeights, Linear, Norm
from specx.graphs.architecture import ArchitectureSpec

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
        self.family = self._family(config)

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

    def _family(self, config: PretrainedConfig) -> DecoderFamily:
        raise NotImplementedError

    def weights(self, model: PreTrainedModel) -> DecoderWeights:
        """The model's weights in the graph builder's layout (float32 numpy; the builder casts)."""
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

    def _family(self, config: PretrainedConfig) -> DecoderFamily:
        if config.activation_function not in GELU_TANH:
            raise UnsupportedModelError(f"gpt2 activation {config.activation_function!r} is not supported "
                                        f"(supported: {', '.join(GELU_TANH)})")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
            raise UnsupportedModelError("gpt2 models with non-standard attention scaling are not supported")
        return DecoderFamily(norm="layer", norm_eps=float(config.layer_norm_epsilon), mlp="gelu_tanh")

    def weights(self, model: PreTrainedModel) -> DecoderWeights:
        w = _numpy_state(model)
        layers = []
        for i in range(self.spec.num_layers):
            p = f"transformer.h.{i}."
            layers.append(LayerWeights(  # Conv1D weights are already (in, out)
                attn_norm=Norm(w[p + "ln_1.weight"], w[p + "ln_1.bias"]),
                qkv=Linear(w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]),
                o=Linear(w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"]),
                mlp_norm=Norm(w[p + "ln_2.weight"], w[p + "ln_2.bias"]),
                up=Linear(w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]),
                down=Linear(w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"]),
            ))
        return DecoderWeights(
            embed=w["transformer.wte.weight"],
            layers=tuple(layers),
            final_norm=Norm(w["transformer.ln_f.weight"], w["transformer.ln_f.bias"]),
            lm_head=None if self.spec.tied_embeddings else w["lm_head.weight"].T,
            pos_embed=w["transformer.wpe.weight"],
        )


@register
class LlamaAdapter(ArchitectureAdapter):
    """Llama family (SmolLM2, TinyLlama, Llama 2/3): RoPE, grouped-query attention, tied or untied head."""

    model_types = ("llama",)
    position_encoding = "rope"

    def _num_kv_heads(self, norm: Any, num_heads: int) -> int:
        return int(getattr(norm, "num_key_value_heads", None) or num_heads)

    def _max_positions(self, config: PretrainedConfig) -> int:
        return int(config.max_position_embeddings)

    def _family(self, config: PretrainedConfig) -> DecoderFamily:
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"llama activation {config.hidden_act!r} is not supported (supported: silu)")
        return DecoderFamily(norm="rms", norm_eps=float(config.rms_norm_eps), mlp="swiglu")

    def weights(self, model: PreTrainedModel) -> DecoderWeights:
        w = _numpy_state(model)
        layers = []
        for i in range(self.spec.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layers.append(LayerWeights(  # nn.Linear weights are (out, in): transposed, q/k/v packed
                attn_norm=Norm(w[p + "input_layernorm.weight"]),
                qkv=_packed(w, [a + "q_proj", a + "k_proj", a + "v_proj"]),
                o=_packed(w, [a + "o_proj"]),
                mlp_norm=Norm(w[p + "post_attention_layernorm.weight"]),
                gate=_packed(w, [m + "gate_proj"]),
                up=_packed(w, [m + "up_proj"]),
                down=_packed(w, [m + "down_proj"]),
            ))
        cos, sin = _rope_tables(model, self.spec)
        return DecoderWeights(
            embed=w["model.embed_tokens.weight"],
            layers=tuple(layers),
            final_norm=Norm(w["model.norm.weight"]),
            lm_head=None if self.spec.tied_embeddings else w["lm_head.weight"].T,
            rope_cos=cos,
            rope_sin=sin,
        )


GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _numpy_state(model: PreTrainedModel) -> dict[str, np.ndarray]:
    return {name: t.detach().to(torch.float32).numpy() for name, t in model.state_dict().items()}


def _packed(w: dict[str, np.ndarray], linears: list[str]) -> Linear:
    """nn.Linear weights (out, in) side by side as one (in, sum of outs) matrix; biases likewise, if any."""
    weight = np.concatenate([w[f"{name}.weight"] for name in linears], axis=0).T
    biases = [w.get(f"{name}.bias") for name in linears]
    bias = np.concatenate(biases) if all(b is not None for b in biases) else None
    return Linear(np.ascontiguousarray(weight), bias)


def _rope_tables(model: PreTrainedModel, spec: ArchitectureSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches (max_positions, head_dim / 2) from the model's own rotary module (any rope scaling)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(spec.max_positions)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # (1, max_positions, head_dim): the frequencies twice over
    half = spec.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()

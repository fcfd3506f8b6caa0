"""Per-architecture differences, in small adapter classes registered by transformers ``model_type``.

Each adapter normalises a Hugging Face config once into an ``ArchitectureSpec`` (optimum's normalized configs supply
the common figures) and a ``DecoderFamily`` (norm, activation), hands the graph builder its weights in the builder's
layout (``DecoderWeights``: x @ W matrices, q/k/v and gate/up packed), and knows how the PyTorch reference's KV cache
is built from and flattened to plain tensors.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from specx.errors import UnsupportedModelError
from specx.graphs.decoder import (GLOBAL_ROPE, LOCAL_ROPE, DecoderFamily, DecoderWeights, LayerKind, LayerWeights,
                                  Linear, Norm)
from specx.graphs.architecture import ArchitectureSpec

try:  # optimum (the export extra) normalises config names; without it, transformers' standard names serve
    from optimum.utils import NormalizedConfigManager
    from optimum.utils.normalized_config import NormalizedTextConfigWithGQA
except ImportError:  # e.g. a GPU machine with torch and transformers but no registry to install optimum from
    NormalizedConfigManager = NormalizedTextConfigWithGQA = None

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


def standard_names(config: PretrainedConfig) -> SimpleNamespace:
    """The figures optimum's normalized text configs give, read from transformers' standard names (a config's
    attribute_map already maps them, e.g. gpt2's n_layer / n_embd / n_head): used where optimum is not installed."""
    return SimpleNamespace(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                           num_attention_heads=config.num_attention_heads, vocab_size=config.vocab_size,
                           num_key_value_heads=getattr(config, "num_key_value_heads", None))


class ArchitectureAdapter:
    model_types: ClassVar[tuple[str, ...]] = ()
    position_encoding: ClassVar[str] = ""
    default_draft: ClassVar[str | None] = None  # hub id of the family's draft, if it has a standard one

    def __init__(self, config: PretrainedConfig):
        self.config = config
        self.spec = self._normalise(config)
        self.family = self._family(config)

    def _normalise(self, config: PretrainedConfig) -> ArchitectureSpec:
        norm = self._normalized_config(config)
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

    def _normalized_config(self, config: PretrainedConfig) -> Any:
        if NormalizedConfigManager is None:
            return standard_names(config)
        return NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)

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
        return DynamicCache(pairs)  # full layers keep every row, as the static cache does; windows are in the mask

    def reference_mask(self, bias: torch.Tensor, window_bias: dict[int, torch.Tensor]) -> Any:
        """The attention mask the PyTorch model takes for a pass: the tree bias, the windowed one where every layer
        slides, or transformers' per-layer-type mapping where only some do."""
        windows = {self.family.layer(i).window for i in range(self.spec.num_layers)}
        if windows == {None}:
            return bias
        if len(windows) == 1:
            return window_bias[windows.pop()]
        sliding = [w for w in windows if w is not None]
        if len(sliding) != 1:
            raise UnsupportedModelError(f"layers with several sliding windows ({sorted(sliding)}) are not supported")
        return {"full_attention": bias, "sliding_attention": window_bias[sliding[0]]}

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


class RopeAdapter(ArchitectureAdapter):
    """The llama lineage: RMSNorm, rotary positions, grouped-query attention, a gated MLP, tied or untied head.

    Each family below differs from it in a few class fields and hooks: the weights' names, q/k norms, sandwich norms,
    norms stored as (1 + weight), windows and rotary tables per layer."""

    position_encoding = "rope"
    qk_norm: ClassVar[bool] = False
    sandwich_norms: ClassVar[bool] = False  # gemma: pre and post norms around attention and MLP
    norm_offset: ClassVar[float] = 0.0  # gemma's RMSNorm scales by (1 + weight)
    activations: ClassVar[dict[str, str]] = {"silu": "swiglu"}  # hidden_act -> MlpKind
    window_on_every_layer: ClassVar[bool] = False  # mistral, phi3: ``sliding_window`` applies to all layers

    def _normalized_config(self, config: PretrainedConfig) -> Any:
        if NormalizedTextConfigWithGQA is None:
            return standard_names(config)
        return NormalizedTextConfigWithGQA(config)  # the standard names every family here uses

    def _num_kv_heads(self, norm: Any, num_heads: int) -> int:
        return int(getattr(norm, "num_key_value_heads", None) or num_heads)

    def _max_positions(self, config: PretrainedConfig) -> int:
        return int(config.max_position_embeddings)

    def _family(self, config: PretrainedConfig) -> DecoderFamily:
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if act not in self.activations:
            raise UnsupportedModelError(f"{config.model_type} activation {act!r} is not supported "
                                        f"(supported: {', '.join(self.activations)})")
        return DecoderFamily(norm="rms", norm_eps=float(config.rms_norm_eps), mlp=self.activations[act],  # type: ignore[arg-type]
                             qk_norm=self.qk_norm, sandwich_norms=self.sandwich_norms,
                             rotary_dim=self._rotary_dim(config), layers=self._layer_kinds(config),
                             **self._family_extras(config))

    def _family_extras(self, config: PretrainedConfig) -> dict[str, Any]:
        """Scales and softcaps (gemma)."""
        return {}

    def _rotary_dim(self, config: PretrainedConfig) -> int | None:
        factor = float((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
        return None if factor == 1.0 else int(self.spec.head_dim * factor)

    def _layer_kinds(self, config: PretrainedConfig) -> tuple[LayerKind, ...]:
        """Per layer: its sliding window (``layer_types``, or every layer where the family slides everywhere) and
        rotary table."""
        window = getattr(config, "sliding_window", None)
        every = ["sliding_attention" if window else "full_attention"] * self.spec.num_layers
        types = every if self.window_on_every_layer else (getattr(config, "layer_types", None) or every)
        kinds = tuple(LayerKind(window=int(window) if t == "sliding_attention" and window else None,
                                rope=self._layer_rope(config, i, t)) for i, t in enumerate(types))
        return kinds if any(k != LayerKind() for k in kinds) else ()

    def _layer_rope(self, config: PretrainedConfig, layer: int, layer_type: str) -> str | None:
        return GLOBAL_ROPE

    # -- weights -------------------------------------------------------------------------------------------------
    def weights(self, model: PreTrainedModel) -> DecoderWeights:
        w = _numpy_state(model)
        layers = tuple(self._layer(w, f"model.layers.{i}.") for i in range(self.spec.num_layers))
        tables = self._rope_tables(model)
        glob, local = tables.get(GLOBAL_ROPE, (None, None)), tables.get(LOCAL_ROPE, (None, None))
        return DecoderWeights(
            embed=w["model.embed_tokens.weight"],
            layers=layers,
            final_norm=self._norm(w, "model.norm"),
            lm_head=None if self.spec.tied_embeddings else w["lm_head.weight"].T,
            rope_cos=glob[0],
            rope_sin=glob[1],
            rope_local_cos=local[0],
            rope_local_sin=local[1],
        )

    def _layer(self, w: dict[str, np.ndarray], p: str) -> LayerWeights:
        a, m = p + "self_attn.", p + "mlp."
        gate, up = self._gate_up(w, m)
        return LayerWeights(  # nn.Linear weights are (out, in): transposed, q/k/v packed
            attn_norm=self._norm(w, p + "input_layernorm"),
            qkv=self._qkv(w, a),
            o=_packed(w, [a + "o_proj"]),
            mlp_norm=self._norm(w, p + ("pre_feedforward_layernorm" if self.sandwich_norms
                                        else "post_attention_layernorm")),
            gate=gate,
            up=up,
            down=_packed(w, [m + "down_proj"]),
            q_norm=self._norm(w, a + "q_norm") if self.qk_norm else None,
            k_norm=self._norm(w, a + "k_norm") if self.qk_norm else None,
            attn_out_norm=self._norm(w, p + "post_attention_layernorm") if self.sandwich_norms else None,
            mlp_out_norm=self._norm(w, p + "post_feedforward_layernorm") if self.sandwich_norms else None,
        )

    def _norm(self, w: dict[str, np.ndarray], name: str) -> Norm:
        return Norm(w[f"{name}.weight"] + np.float32(self.norm_offset))

    def _qkv(self, w: dict[str, np.ndarray], a: str) -> Linear:
        return _packed(w, [a + "q_proj", a + "k_proj", a + "v_proj"])

    def _gate_up(self, w: dict[str, np.ndarray], m: str) -> tuple[Linear, Linear]:
        return _packed(w, [m + "gate_proj"]), _packed(w, [m + "up_proj"])

    def _rope_tables(self, model: PreTrainedModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {GLOBAL_ROPE: _rope_table(model.model.rotary_emb, self.spec.max_positions)}


@register
class LlamaAdapter(RopeAdapter):
    """Llama family (SmolLM2, TinyLlama, Llama 2/3, 3.2 with llama3 rope scaling)."""

    model_types = ("llama",)


@register
class MistralAdapter(RopeAdapter):
    """Mistral: llama with a sliding window on every layer (``sliding_window``; None: full attention)."""

    model_types = ("mistral",)
    window_on_every_layer = True


@register
class Qwen2Adapter(RopeAdapter):
    """Qwen2 / Qwen2.5: q/k/v projections with bias; sliding windows on the layers ``layer_types`` names."""

    model_types = ("qwen2",)


@register
class Qwen3Adapter(RopeAdapter):
    """Qwen3: per-head RMSNorm of q and k before rotary; head_dim set apart from hidden / heads."""

    model_types = ("qwen3",)
    qk_norm = True


@register
class SmolLM3Adapter(RopeAdapter):
    """SmolLM3: llama whose every ``no_rope_layer_interval``-th layer has no rotary positions (NoPE)."""

    model_types = ("smollm3",)

    def _layer_rope(self, config: PretrainedConfig, layer: int, layer_type: str) -> str | None:
        return GLOBAL_ROPE if config.no_rope_layers[layer] else None


@register
class Phi3Adapter(RopeAdapter):
    """Phi-3 / 3.5 / 4-mini: packed qkv_proj and gate_up_proj, partial rotary, su/longrope scaling, a sliding
    window on every layer (where ``sliding_window`` is set)."""

    model_types = ("phi3",)
    window_on_every_layer = True

    def _qkv(self, w: dict[str, np.ndarray], a: str) -> Linear:
        return _packed(w, [a + "qkv_proj"])

    def _gate_up(self, w: dict[str, np.ndarray], m: str) -> tuple[Linear, Linear]:
        packed = w[m + "gate_up_proj.weight"]  # (2 ffn, hidden): gate rows first, then up
        gate, up = np.split(packed, 2, axis=0)
        return Linear(np.ascontiguousarray(gate.T)), Linear(np.ascontiguousarray(up.T))


@register
class Gemma2Adapter(RopeAdapter):
    """Gemma 2: embeddings x sqrt(hidden), RMSNorm (1 + weight), sandwich norms, gated GELU-tanh MLP, attention and
    final logit softcapping, query_pre_attn_scalar, sliding windows on alternate layers."""

    model_types = ("gemma2",)
    sandwich_norms = True
    norm_offset = 1.0
    activations = {act: "geglu_tanh" for act in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")}

    def _family_extras(self, config: PretrainedConfig) -> dict[str, Any]:
        return {
            "embed_scale": float(self.spec.hidden_size ** 0.5),
            "attn_scale": float(config.query_pre_attn_scalar ** -0.5),
            "attn_softcap": float(getattr(config, "attn_logit_softcapping", None) or 0.0),
            "final_softcap": float(getattr(config, "final_logit_softcapping", None) or 0.0),
        }


@register
class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3 (text): Gemma 2's layer with q/k norms; sliding layers read their own rotary table (another base)."""

    model_types = ("gemma3_text",)
    qk_norm = True

    def _layer_rope(self, config: PretrainedConfig, layer: int, layer_type: str) -> str | None:
        return LOCAL_ROPE if layer_type == "sliding_attention" else GLOBAL_ROPE

    def _rope_tables(self, model: PreTrainedModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rotary, n = model.model.rotary_emb, self.spec.max_positions
        tables = {"full_attention": GLOBAL_ROPE, "sliding_attention": LOCAL_ROPE}
        return {tables[t]: _rope_table(rotary, n, t) for t in set(model.config.layer_types)}


GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _numpy_state(model: PreTrainedModel) -> dict[str, np.ndarray]:
    return {name: t.detach().to(torch.float32).numpy() for name, t in model.state_dict().items()}


def _packed(w: dict[str, np.ndarray], linears: list[str]) -> Linear:
    """nn.Linear weights (out, in) side by side as one (in, sum of outs) matrix; biases likewise, if any."""
    weight = np.concatenate([w[f"{name}.weight"] for name in linears], axis=0).T
    biases = [w.get(f"{name}.bias") for name in linears]
    bias = np.concatenate(biases) if all(b is not None for b in biases) else None
    return Linear(np.ascontiguousarray(weight), bias)


def _rope_table(rotary: torch.nn.Module, positions: int, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches (positions, rotary_dim / 2) from the model's own rotary module (any rope scaling).

    Row p holds what the model uses for a token at position p decoded one at a time. Longrope switches tables on the
    length of the pass (short factors up to ``original_max_position_embeddings``, long beyond): rows below the
    original length come from the short table, the rest from the long one, so that a tree pass and token-by-token
    decoding see the same positions (a single prompt pass across the boundary differs from transformers, which
    uses the long table for the whole pass)."""
    args = (layer_type,) if layer_type else ()

    def table(n: int) -> tuple[np.ndarray, np.ndarray]:
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, torch.arange(n)[None], *args)  # (1, n, rotary_dim): the frequencies twice
        half = cos.shape[-1] // 2
        return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()

    cos, sin = table(positions)
    original = _longrope_original_length(rotary, layer_type)
    if original is not None and original < positions:
        short_cos, short_sin = table(original)  # leaves the module on its short factors, as loaded
        cos, sin = cos.copy(), sin.copy()
        cos[:original], sin[:original] = short_cos, short_sin
    return cos, sin


def _longrope_original_length(rotary: torch.nn.Module, layer_type: str | None) -> int | None:
    rope_type = getattr(rotary, "rope_type", None)
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type)
    if rope_type != "longrope":
        return None
    params = rotary.config.rope_parameters
    params = params.get(layer_type, params) if layer_type else params
    return int(params.get("original_max_position_embeddings") or rotary.config.original_max_position_embeddings)

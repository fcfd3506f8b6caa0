"""Fused tree-attention decoder graphs, built directly from the weights (llama and gpt2 families).

One graph per model, the contract of ``specx.graphs.contract`` (static KV: past and present are the same
(batch, kv_heads, capacity, head_dim) buffers, written in place), about a dozen ONNX Runtime nodes per layer::

    input_ids --Gather(embed)--(+ Gather(pos_embed, position_ids): learned positions)--> h
    tree_mask --Where(0, -inf)--> attention_bias       Shape(tree_mask)[3] --> total_sequence_length, seqlens_k
    layer i:   SkipNorm(h, residual) -> x ---- attention(x) ---> a      MatMul(qkv), GroupQueryAttention, MatMul(o)
               SkipNorm(a, residual) -> x ---- mlp(x) ---------> h      MatMul(gate), MatMul(up), act, Mul, MatMul
    SkipNorm(h, residual) -> MatMul(lm_head) -> logits
    Concat(inputs of the contract's feature layers) -> features           (targets of a feature draft only)

The first layer's norm has no skip input; the last layer's output meets the final norm. Biases of the projections
that feed a residual (o_proj, down_proj) ride in the following SkipNorm's bias input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto

from specx.graphs.builder import MS_DOMAIN, GraphBuilder
from specx.graphs.contract import FEATURES, INPUT_IDS, LOGITS, POSITION_IDS, TREE_MASK, GraphContract
from specx.graphs.architecture import ArchitectureSpec

MASK_AXIS_TOTAL = 3  # tree_mask (batch, 1, seq, total)
SILU_ALPHA = 1.0  # QuickGelu(x, alpha) = x * sigmoid(alpha * x); alpha 1 is SiLU
ROTARY_IN_ATTENTION_MULTIPLE = 16  # GroupQueryAttention's do_rotary needs head_dim % 16 == 0 (CPU kernel)

NormKind = Literal["rms", "layer"]
MlpKind = Literal["swiglu", "gelu_tanh"]
HeadKind = Literal["shared", "own"]


@dataclass(frozen=True)
class Norm:
    weight: np.ndarray  # (hidden,)
    bias: np.ndarray | None = None  # LayerNorm's beta; None for RMSNorm


@dataclass(frozen=True)
class Linear:
    weight: np.ndarray  # (in, out): x @ weight
    bias: np.ndarray | None = None  # (out,)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Norm
    qkv: Linear  # (hidden, (heads + 2 * kv_heads) * head_dim): q, k, v packed in that order
    o: Linear  # (heads * head_dim, hidden)
    mlp_norm: Norm
    up: Linear  # (hidden, ffn): swiglu's up projection, gelu's fc
    down: Linear  # (ffn, hidden)
    gate: Linear | None = None  # (hidden, ffn): swiglu only


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # (vocab, hidden)
    layers: tuple[LayerWeights, ...]
    final_norm: Norm
    lm_head: np.ndarray | None  # (hidden, vocab); None: tied to the embedding
    pos_embed: np.ndarray | None = None  # (max_positions, hidden), learned positions
    rope_cos: np.ndarray | None = None  # (max_positions, head_dim / 2), rotary positions
    rope_sin: np.ndarray | None = None


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between the families beyond sizes (``ArchitectureSpec``): normalised once by the adapter."""

    norm: NormKind
    norm_eps: float
    mlp: MlpKind


@dataclass(frozen=True)
class _Attention:
    """Graph-level tensors every layer's attention reads."""

    bias: str  # (batch, 1, seq, total) additive: 0 where the tree mask allows, the dtype's minimum elsewhere
    seqlens_k: str  # (batch,) int32: total - 1
    total_length: str  # () int32: past + seq


def build_decoder(arch: ArchitectureSpec, family: DecoderFamily, weights: DecoderWeights, contract: GraphContract,
                  opset: int, head: HeadKind = "shared") -> onnx.ModelProto:
    """The decoder graph. ``head="own"`` gives a tied model its own transposed lm_head copy (quantizable)."""
    float_dtype = "float16" if contract.kv_dtype == "float16" else "float32"
    b = GraphBuilder("specx_decoder", float_dtype)
    attention = _attention_inputs(b, float_dtype)
    h = _embeddings(b, arch, weights)
    x, residual = _norm(b, "/model/layers.0/input_layernorm", family, weights.layers[0].attn_norm, h)
    layer_inputs = []  # (batch, seq, hidden): the residual stream entering each layer
    for i, layer in enumerate(weights.layers):
        prefix = f"/model/layers.{i}"
        layer_inputs.append(residual)
        a = _attention(b, i, arch, weights, layer, attention, x)
        x, residual = _skip_norm(b, f"{prefix}/post_attention_layernorm", family, layer.mlp_norm, a, residual,
                                 layer.o.bias)
        h = _mlp(b, f"{prefix}/mlp", family, layer, x)
        if i + 1 < len(weights.layers):
            x, residual = _skip_norm(b, f"/model/layers.{i + 1}/input_layernorm", family,
                                     weights.layers[i + 1].attn_norm, h, residual, layer.down.bias)
    x, _ = _skip_norm(b, "/model/norm", family, weights.final_norm, h, residual, weights.layers[-1].down.bias)
    logits = _lm_head(b, weights, x, head, float_dtype)
    b.rename_output(logits, LOGITS)
    if contract.feature_layers:
        _features(b, [layer_inputs[k] for k in contract.feature_layers], float_dtype)
    return b.model(contract.inputs, contract.outputs, opset)


def _features(b: GraphBuilder, layer_inputs: list[str], float_dtype: str) -> None:
    """The feature draft's input: the chosen layers' inputs side by side, (batch, seq, layers * hidden) float32."""
    features = b.op1("Concat", layer_inputs, "/model/features/Concat", axis=-1)
    if float_dtype != "float32":
        features = b.op1("Cast", [features], "/model/features/Cast", to=TensorProto.FLOAT)
    b.rename_output(features, FEATURES)


def _attention_inputs(b: GraphBuilder, float_dtype: str) -> _Attention:
    """tree_mask (batch, 1, seq, total) bool -> additive bias, seqlens_k = total - 1 per batch row, total length."""
    zero = b.weight("/model/constants/zero", np.zeros((), np.float32))
    blocked = b.weight("/model/constants/blocked", np.array(np.finfo(float_dtype).min))
    bias = b.op1("Where", [TREE_MASK, zero, blocked], "/model/attn_mask/Where")  # (batch, 1, seq, total)
    mask_shape = b.op1("Shape", [TREE_MASK], "/model/attn_mask/Shape")
    total = b.op1("Gather", [mask_shape, b.constant("/model/constants/axis_total", np.array(MASK_AXIS_TOTAL))],
                  "/model/attn_mask/total/Gather")  # () int64
    total32 = b.op1("Cast", [total], "/model/attn_mask/total/Cast", to=TensorProto.INT32)
    last = b.op1("Sub", [total32, b.constant("/model/constants/one_i32", np.array(1, np.int32))],
                 "/model/attn_mask/seqlens_k/Sub")
    batch = b.op1("Shape", [INPUT_IDS], "/model/attn_mask/batch/Shape", end=1)  # (1,)
    seqlens = b.op1("Expand", [last, batch], "/model/attn_mask/seqlens_k/Expand")  # (batch,) int32
    return _Attention(bias, seqlens, total32)


def _embeddings(b: GraphBuilder, arch: ArchitectureSpec, weights: DecoderWeights) -> str:
    """input_ids (batch, seq) -> hidden (batch, seq, hidden), plus learned positions where the family has them."""
    embed = b.weight("model.embed_tokens.weight", weights.embed)
    h = b.op1("Gather", [embed, INPUT_IDS], "/model/embed_tokens/Gather")
    if arch.position_encoding == "learned":
        table = b.weight("model.embed_positions.weight", weights.pos_embed)
        pos = b.op1("Gather", [table, POSITION_IDS], "/model/embed_positions/Gather")
        h = b.op1("Add", [h, pos], "/model/embeddings/Add")
    return h


def _norm(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm, x: str) -> tuple[str, str]:
    """The first layer's norm (no skip input); returns (normed, residual = x)."""
    gamma = b.weight(_param(prefix, "weight"), norm.weight)
    if family.norm == "rms":
        out = b.op1("SimplifiedLayerNormalization", [x, gamma], f"{prefix}/SimplifiedLayerNorm", axis=-1,
                    epsilon=family.norm_eps, stash_type=1)
    else:
        beta = b.weight(_param(prefix, "bias"), norm.bias)
        out = b.op1("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNorm", axis=-1, epsilon=family.norm_eps,
                    stash_type=1)
    return out, x


def _skip_norm(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm, x: str, skip: str,
               bias: np.ndarray | None) -> tuple[str, str]:
    """norm(x + skip + bias); returns (normed, the sum: the next residual)."""
    gamma = b.weight(_param(prefix, "weight"), norm.weight)
    bias_name = b.weight(_param(prefix, "skip_bias"), bias) if bias is not None else ""
    if family.norm == "rms":
        inputs, op = [x, skip, gamma, bias_name], "SkipSimplifiedLayerNormalization"
    else:
        inputs, op = [x, skip, gamma, b.weight(_param(prefix, "bias"), norm.bias), bias_name], "SkipLayerNormalization"
    while inputs[-1] == "":
        inputs.pop()
    out = b.op(op, inputs, f"{prefix}/{op.replace('Normalization', 'Norm')}", outputs=4, domain=MS_DOMAIN,
               epsilon=family.norm_eps)
    return out[0], out[3]


def _linear(b: GraphBuilder, prefix: str, linear: Linear, x: str, with_bias: bool = True) -> str:
    out = b.op1("MatMul", [x, b.weight(_param(prefix, "weight"), linear.weight)], f"{prefix}/MatMul")
    if with_bias and linear.bias is not None:
        out = b.op1("Add", [out, b.weight(_param(prefix, "bias"), linear.bias)], f"{prefix}/Add")
    return out


def _attention(b: GraphBuilder, i: int, arch: ArchitectureSpec, weights: DecoderWeights, layer: LayerWeights,
               attention: _Attention, x: str) -> str:
    """Packed QKV, rotary with the tree's positions (rope families), GroupQueryAttention over the static cache with
    the tree bias, output projection.

        x -> MatMul(qkv) [+bias] -> qkv                     (batch, seq, (heads + 2 kv_heads) * hd), packed
        GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, total, cos, sin, position_ids, attention_bias)
            rotary inside the kernel at position_ids (tree positions, not seqlens) where head_dim % 16 == 0;
            otherwise Split -> RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention(q, k, v, ...)
            -> (batch, seq, heads*hd); present_k/v written in place at rows [total - seq, total)
        -> MatMul(o_proj)                                   its bias goes to the next SkipNorm
    """
    prefix = f"/model/layers.{i}"
    qkv = _linear(b, f"{prefix}/attn/qkv_proj", layer.qkv, x)
    q, k, v, cos, sin, positions, rotary = qkv, "", "", "", "", "", 0
    if arch.position_encoding == "rope":
        cos = _shared_weight(b, "model.rotary.cos_cache", weights.rope_cos)
        sin = _shared_weight(b, "model.rotary.sin_cache", weights.rope_sin)
        if arch.head_dim % ROTARY_IN_ATTENTION_MULTIPLE == 0:
            positions, rotary = POSITION_IDS, 1
        else:
            q, k, v = _split_rotary(b, prefix, arch, qkv, cos, sin)
            cos = sin = ""
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    out, present_k, present_v = b.op(
        "GroupQueryAttention",
        [q, k, v, past_k, past_v, attention.seqlens_k, attention.total_length, cos, sin, positions, attention.bias],
        f"{prefix}/attn/GroupQueryAttention", outputs=3, domain=MS_DOMAIN, num_heads=arch.num_heads,
        kv_num_heads=arch.num_kv_heads, scale=float(arch.head_dim ** -0.5), do_rotary=rotary, rotary_interleaved=0)
    b.rename_output(present_k, f"present.{i}.key")
    b.rename_output(present_v, f"present.{i}.value")
    return _linear(b, f"{prefix}/attn/o_proj", layer.o, out, with_bias=False)


def _split_rotary(b: GraphBuilder, prefix: str, arch: ArchitectureSpec, qkv: str, cos: str,
                  sin: str) -> tuple[str, str, str]:
    """qkv -> Split -> RotaryEmbedding(q), RotaryEmbedding(k), v: for head sizes the fused kernel does not take."""
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    sizes = b.constant(_param(prefix, "attn.qkv_sizes"), np.array([q_size, kv_size, kv_size], np.int64))
    q, k, v = b.op("Split", [qkv, sizes], f"{prefix}/attn/qkv_proj/Split", outputs=3, axis=-1)
    q = b.op1("RotaryEmbedding", [q, POSITION_IDS, cos, sin], f"{prefix}/attn/q_rotary/RotaryEmbedding",
              domain=MS_DOMAIN, num_heads=arch.num_heads, interleaved=0)
    k = b.op1("RotaryEmbedding", [k, POSITION_IDS, cos, sin], f"{prefix}/attn/k_rotary/RotaryEmbedding",
              domain=MS_DOMAIN, num_heads=arch.num_kv_heads, interleaved=0)
    return q, k, v


def _mlp(b: GraphBuilder, prefix: str, family: DecoderFamily, layer: LayerWeights, x: str) -> str:
    """swiglu: MatMul(gate), MatMul(up) -> QuickGelu(gate, 1) * up -> MatMul(down)
    gelu_tanh: MatMul(fc) -> FastGelu(+bias) -> MatMul(proj); down's bias goes to the next SkipNorm."""
    if family.mlp == "swiglu":
        if layer.gate is None:
            raise ValueError("a swiglu MLP needs gate weights")
        gate = _linear(b, f"{prefix}/gate_proj", layer.gate, x)
        up = _linear(b, f"{prefix}/up_proj", layer.up, x)
        act = b.op1("QuickGelu", [gate], f"{prefix}/act_fn/QuickGelu", domain=MS_DOMAIN, alpha=SILU_ALPHA)
        h = b.op1("Mul", [act, up], f"{prefix}/Mul")
    else:
        fc = _linear(b, f"{prefix}/fc", layer.up, x, with_bias=False)
        inputs = [fc] + ([b.weight(_param(prefix, "fc.bias"), layer.up.bias)] if layer.up.bias is not None else [])
        h = b.op1("FastGelu", inputs, f"{prefix}/act_fn/FastGelu", domain=MS_DOMAIN)
    return _linear(b, f"{prefix}/down_proj", layer.down, h, with_bias=False)


def _lm_head(b: GraphBuilder, weights: DecoderWeights, x: str, head: HeadKind, float_dtype: str) -> str:
    """x (batch, seq, hidden) -> logits (batch, seq, vocab) float32.

    A tied head reads the embedding table itself (FusedMatMul, transB) unless ``head="own"`` asks for a transposed
    copy, which MatMulNBits can quantize."""
    if weights.lm_head is not None:
        logits = b.op1("MatMul", [x, b.weight("lm_head.weight", weights.lm_head)], "/lm_head/MatMul")
    elif head == "own":
        logits = b.op1("MatMul", [x, b.weight("lm_head.weight", weights.embed.T)], "/lm_head/MatMul")
    else:
        logits = b.op1("FusedMatMul", [x, "model.embed_tokens.weight"], "/lm_head/FusedMatMul", domain=MS_DOMAIN,
                       transB=1)
    if float_dtype != "float32":
        logits = b.op1("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
    return logits


def _shared_weight(b: GraphBuilder, name: str, array: np.ndarray | None) -> str:
    if array is None:
        raise ValueError(f"{name} is required for this position encoding")
    return name if b.has(name) else b.weight(name, array)


def _param(prefix: str, suffix: str) -> str:
    """Initializer name from a node prefix: /model/layers.0/attn/qkv_proj + weight -> model.layers.0.attn.qkv_proj.weight"""
    return f"{prefix[1:].replace('/', '.')}.{suffix}"

"""The feature draft's graph: a decoder layer (or a few) that reads the target's features (EAGLE-3 style), built
from the trained weights with the target decoder's own blocks (``specx.graphs.decoder``)::

    features (batch, feature_rows, F) -Reshape(.., chunks, hidden)-RMSNorm-Reshape-MatMul(fuse)-> (.., hidden)
    hidden   (batch, hidden_rows, hidden) -------------------------------------------  the draft's own states
        Concat(axis=1) -> g (batch, seq, hidden) -RMSNorm->  the first feature_rows tokens, then the rest
    input_ids --Gather(embed)-RMSNorm-> e;  Concat(e, g, axis=-1) --MatMul(fc)--> x       (batch, seq, hidden)

(each layer's features are normalised on their own: their scales differ by orders of magnitude; the per-chunk
gains are folded into the fuse matrix)
    x -> RMSNorm -> attention (GroupQueryAttention over the draft's own cache, tree bias) -> SkipNorm(+x)
      -> SwiGLU MLP -> SkipNorm(+residual, next layer's norm) -> ... (one layer by default, --draft-layers)
      -> the last layer's SkipNorm(+residual, final norm) -> normed, sum
    sum    -> hidden_states (batch, seq, hidden)         what the next tree level reads as ``hidden``
    normed -> MatMul(head) -> logits (batch, seq, draft_vocab)

In the target's dtype: a float16 target (the CUDA formats) gets a float16 draft (weights, activations, cache) with
the target's static shapes (a capacity-wide mask and ``past_length``: what a CUDA graph replays); its float32
``features`` / ``hidden`` inputs are cast to float16 on entry and ``logits`` / ``hidden_states`` back to float32, so
the contract and the runtime are the same for every dtype.

The layer is llama-style (RMSNorm, rotary, SwiGLU) whatever the target's family: one trainer, one graph path. Row t
of a pass predicts the token after ``input_ids[t]`` from that token's embedding and the state *before* it (the
target's features at position t - 1, or the parent node's ``hidden_states``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from specx.graphs.builder import ONNX_TYPES, GraphBuilder
from specx.graphs.contract import FEATURES, HIDDEN, HIDDEN_STATES, INPUT_IDS, LOGITS, GraphContract
from specx.graphs.decoder import (GLOBAL_ROPE, DecoderFamily, LayerWeights, Linear, Norm, _attention, _linear, _mlp,
                                  _norm, _skip_norm, attention_inputs, graph_opset, top_tokens)
from specx.graphs.architecture import ArchitectureSpec

DRAFT_NORM_EPS = 1e-5


@dataclass(frozen=True)
class FeatureDraftWeights:
    embed: np.ndarray  # (target vocab, hidden): the target's token embedding, frozen
    fuse: Linear  # (feature_width, hidden): target features -> hidden
    fc: Linear  # (2 * hidden, hidden): [token embedding, state] -> the layer's input
    embed_norm: Norm  # RMSNorm of the token embedding, and of the state, before they meet
    state_norm: Norm
    feature_chunks: int  # target layers in the features (each RMS-normalised, gains folded into fuse)
    layers: tuple[LayerWeights, ...]  # one by default (--draft-layers)
    final_norm: Norm
    head: np.ndarray  # (hidden, draft_vocab)
    rope_cos: np.ndarray  # (max_positions, head_dim / 2)
    rope_sin: np.ndarray


def draft_family(eps: float = DRAFT_NORM_EPS) -> DecoderFamily:
    return DecoderFamily(norm="rms", norm_eps=eps, mlp="swiglu")


def build_feature_draft(arch: ArchitectureSpec, weights: FeatureDraftWeights, contract: GraphContract,
                        opset: int, eps: float = DRAFT_NORM_EPS) -> onnx.ModelProto:
    """``arch``: the draft layers' sizes (rope)."""
    family = draft_family(eps)
    b = GraphBuilder("specx_feature_draft", contract.kv_dtype)
    attention = attention_inputs(b, arch, contract)
    hidden = weights.embed.shape[1]
    chunks = b.op1("Reshape", [_to_graph_dtype(b, FEATURES), b.constant("/draft/constants/chunk_shape",
                                                    np.array([0, 0, weights.feature_chunks, hidden], np.int64))],
                   "/draft/features/Reshape")  # (batch, feature_rows, chunks, hidden)
    normed = _rms(b, "/draft/feature_norm", chunks, np.ones(hidden, np.float32), eps)
    flat = b.op1("Reshape", [normed, b.constant("/draft/constants/flat_shape", np.array([0, 0, weights.feature_chunks * hidden], np.int64))],
                 "/draft/features/Reshape_1")
    fused = b.op1("MatMul", [flat, b.weight("draft.fuse.weight", weights.fuse.weight)], "/draft/fuse/MatMul")
    state = b.op1("Concat", [fused, _to_graph_dtype(b, HIDDEN)], "/draft/state/Concat", axis=1)  # (batch, seq, hidden)
    state = _rms(b, "/draft/state_norm", state, weights.state_norm.weight, eps)
    embed = b.op1("Gather", [b.weight("model.embed_tokens.weight", weights.embed), INPUT_IDS],
                  "/model/embed_tokens/Gather")
    embed = _rms(b, "/draft/embed_norm", embed, weights.embed_norm.weight, eps)
    joined = b.op1("Concat", [embed, state], "/draft/input/Concat", axis=-1)  # (batch, seq, 2 * hidden)
    x0 = _linear(b, "/draft/fc", weights.fc, joined)
    layers = weights.layers
    tables = {GLOBAL_ROPE: (weights.rope_cos, weights.rope_sin)}
    x, residual = _norm(b, "/model/layers.0/input_layernorm", family, layers[0].attn_norm, x0)
    for i, layer in enumerate(layers):
        a = _attention(b, i, arch, family, layer, attention, x, tables)
        x, residual = _skip_norm(b, f"/model/layers.{i}/post_attention_layernorm", family, layer.mlp_norm, a,
                                 residual, layer.o.bias)
        h = _mlp(b, f"/model/layers.{i}/mlp", family, layer, x)
        last = i + 1 == len(layers)
        x, residual = _skip_norm(b, "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm", family,
                                 weights.final_norm if last else layers[i + 1].attn_norm, h, residual,
                                 layer.down.bias)
    normed, out = x, residual
    b.rename_output(_to_float32(b, out, "/draft/hidden_states/Cast"), HIDDEN_STATES)
    logits = b.op1("MatMul", [normed, b.weight("lm_head.weight", weights.head)], "/lm_head/MatMul")
    logits = _to_float32(b, logits, "/lm_head/Cast")
    if contract.top_k:
        top_tokens(b, logits, contract.top_k)
    b.rename_output(logits, LOGITS)
    return b.model(contract.inputs, contract.outputs, graph_opset(arch, opset))


def _to_graph_dtype(b: GraphBuilder, name: str) -> str:
    """A float32 input (features, hidden) in the graph's dtype: cast where that is float16 or bfloat16."""
    if b.float_dtype == np.float32:
        return name
    return b.op1("Cast", [name], f"/draft/{name}/Cast", to=ONNX_TYPES[str(b.float_dtype)])


def _to_float32(b: GraphBuilder, tensor: str, node: str) -> str:
    """An output (logits, hidden_states) back to the contract's float32."""
    return tensor if b.float_dtype == np.float32 else b.op1("Cast", [tensor], node, to=TensorProto.FLOAT)


def _rms(b: GraphBuilder, prefix: str, x: str, gamma: np.ndarray, eps: float) -> str:
    return b.op1("SimplifiedLayerNormalization", [x, b.weight(f"{prefix[1:].replace('/', '.')}.weight", gamma)],
                 f"{prefix}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)

"""Fused tree-attention decoder graphs, built directly from the weights (gpt2, llama and the families built on them).

One graph per model, the contract of ``specx.graphs.contract`` (static KV: past and present are the same
(batch, kv_heads, capacity, head_dim) buffers, written in place), about a dozen ONNX Runtime nodes per layer::

    input_ids --Gather(embed)--(x embed_scale)--(+ Gather(pos_embed, position_ids): learned positions)--> h
    tree_mask --Where(0, -inf)--> attention_bias       Shape(tree_mask)[3] --> total_sequence_length, seqlens_k
              --And(window: key position > query position - W)--Where--> one more bias per sliding window
    layer i:   SkipNorm(h, residual) -> x ---- attention(x) ---> a  [-> Norm(a): sandwich families]
               SkipNorm(a, residual) -> x ---- mlp(x) ---------> h  [-> Norm(h): sandwich families]
    SkipNorm(h, residual) -> MatMul(lm_head) [-> Div, Tanh, Mul: final softcap] -> logits -ArgMax-> next_tokens
    Concat(inputs of the contract's feature layers) -> features           (targets of a feature draft only)

Padded passes (quantized CPU targets): ONNX Runtime's CPU kernels compute a one-row call otherwise than a multi-row
one (MLAS's M=1 GEMM inside GroupQueryAttention) and MatMulNBits computes the odd last row of a call with its
one-row kernel at blocks over 32: ~1e-7 apart, which int8-activation matmuls amplify to ~1 logit. At blocks up to 32
a one-token step's attention runs one zero row more (``contract.padded_attention``, ``_pad_attention``), so no
attention call has one row while the matmuls still run one; at larger blocks the runtime pads whole passes with
dummy rows (``contract.min_rows`` 2, ``row_multiple`` 2; tree.pad_rows). Rotary tables are ``contract.spare_rows``
longer (a padded pass at the end of the context reaches past it).

The first layer's norm has no skip input; the last layer's output meets the final norm. Biases of the projections
that feed a residual (o_proj, down_proj) ride in the following SkipNorm's bias input.

What differs between families lives in two small records the adapter fills once: ``DecoderFamily`` (norm kind,
MLP kind, embedding scale, q/k norms, sandwich norms, attention scale and softcaps, partial rotary, and per layer its
sliding window and rotary table) and ``DecoderWeights`` (the arrays). Each feature is one block below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto

from specx.graphs.builder import MS_DOMAIN, GraphBuilder, lowest
from specx.graphs.contract import (FEATURES, INPUT_IDS, LOGITS, NEXT_TOKENS, PAST_LENGTH, POSITION_IDS, TOP_PROBS,
                                   TOP_TOKENS, TREE_MASK, GraphContract)
from specx.graphs.architecture import ArchitectureSpec

MASK_AXIS_TOTAL = 3  # tree_mask (batch, 1, seq, total)
SILU_ALPHA = 1.0  # QuickGelu(x, alpha) = x * sigmoid(alpha * x); alpha 1 is SiLU
ROTARY_IN_ATTENTION_MULTIPLE = 16  # GroupQueryAttention's do_rotary needs head_dim % 16 == 0 (CPU kernel)
GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention refuses other head sizes; those take ONNX's Attention op instead
ONNX_ATTENTION_OPSET = 24  # Attention (opset 23) with TensorScatter (24) writing the static cache in place
KV_AXIS = 2  # (batch, kv_heads, capacity, head_dim)
GLOBAL_ROPE, LOCAL_ROPE = "global", "local"  # the rotary tables a layer may read

NormKind = Literal["rms", "layer"]
MlpKind = Literal["swiglu", "geglu_tanh", "gelu_tanh"]
HeadKind = Literal["shared", "own"]


@dataclass(frozen=True)
class Norm:
    weight: np.ndarray  # (hidden,): gemma's (1 + weight) already added by the adapter
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
    up: Linear  # (hidden, ffn): gated MLPs' up projection, gelu's fc
    down: Linear  # (ffn, hidden)
    gate: Linear | None = None  # (hidden, ffn): gated MLPs only
    q_norm: Norm | None = None  # (head_dim,) per-head RMSNorm of q and k before rotary (qwen3, gemma3)
    k_norm: Norm | None = None
    attn_out_norm: Norm | None = None  # sandwich norms (gemma2/3): the attention's and the MLP's outputs normed
    mlp_out_norm: Norm | None = None  # before they meet the residual


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # (vocab, hidden)
    layers: tuple[LayerWeights, ...]
    final_norm: Norm
    lm_head: np.ndarray | None  # (hidden, vocab); None: tied to the embedding
    pos_embed: np.ndarray | None = None  # (max_positions, hidden), learned positions
    rope_cos: np.ndarray | None = None  # (max_positions, rotary_dim / 2), the global rotary table
    rope_sin: np.ndarray | None = None
    rope_local_cos: np.ndarray | None = None  # the sliding layers' own table (gemma3: another rope base)
    rope_local_sin: np.ndarray | None = None


@dataclass(frozen=True)
class LayerKind:
    """How one layer attends: its sliding window (a token sees the keys at positions > its own - window; None: all)
    and the rotary table it reads (GLOBAL_ROPE, LOCAL_ROPE, or None: no positions at all, NoPE)."""

    window: int | None = None
    rope: str | None = GLOBAL_ROPE


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between the families beyond sizes (``ArchitectureSpec``): normalised once by the adapter."""

    norm: NormKind
    norm_eps: float
    mlp: MlpKind
    embed_scale: float = 1.0  # gemma: sqrt(hidden)
    qk_norm: bool = False
    sandwich_norms: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5 (gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # cap * tanh(scores / cap) before the mask (gemma2); 0: none
    final_softcap: float = 0.0  # the same on the logits
    rotary_dim: int | None = None  # partial rotary (phi3): the leading dims of each head rotated; None: all
    layers: tuple[LayerKind, ...] = ()  # one per layer; empty: every layer global, full attention

    def layer(self, i: int) -> LayerKind:
        return self.layers[i] if self.layers else LayerKind()

    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(sorted({k.window for k in self.layers if k.window is not None}))


@dataclass(frozen=True)
class _AttentionPad:
    """What each layer reads to pad its attention input and slice its output (``_pad_attention``)."""

    row_pads: str  # (6,) int64: Pad's pads for (batch, seq, width): the extra rows at the end
    rows: str  # (1,) int64: the pass's rows (Slice's end)


@dataclass(frozen=True)
class _Attention:
    """Graph-level tensors every layer's attention reads."""

    bias: str  # (batch, 1, seq, total) additive: 0 where the tree mask allows, the dtype's minimum elsewhere
    seqlens_k: str  # (batch,) int32: total - 1
    total_length: str  # () int32: past + seq
    window_bias: dict[int, str]  # window -> the bias with the sliding window applied too
    past_length: str = ""  # (batch,) int64: rows already committed (the ONNX Attention path writes there)
    rows_past: str = ""  # (1,) int64: the same, as Slice's end (the ONNX Attention path)
    positions: str = POSITION_IDS  # (batch, seq [+ 1]) int64: what fused rotary reads
    pad: _AttentionPad | None = None  # a one-row pass's dummy attention row (``_pad_attention``)

    def bias_for(self, kind: LayerKind) -> str:
        return self.bias if kind.window is None else self.window_bias[kind.window]


def uses_gqa(arch: ArchitectureSpec) -> bool:
    """GroupQueryAttention where it takes the head size; ONNX's Attention op (opset 24) elsewhere."""
    return arch.head_dim % GQA_HEAD_MULTIPLE == 0


def graph_opset(arch: ArchitectureSpec, opset: int) -> int:
    """The opset a decoder of ``arch`` is built with: the one asked, raised where the attention path needs it."""
    return opset if uses_gqa(arch) else max(opset, ONNX_ATTENTION_OPSET)


def build_decoder(arch: ArchitectureSpec, family: DecoderFamily, weights: DecoderWeights, contract: GraphContract,
                  opset: int, head: HeadKind = "shared") -> onnx.ModelProto:
    """The decoder graph. ``head="own"`` gives a tied model its own transposed lm_head copy (quantizable)."""
    float_dtype = contract.kv_dtype  # float32, float16 or bfloat16: weights, activations and cache
    b = GraphBuilder("specx_decoder", float_dtype)
    attention = attention_inputs(b, arch, contract, family.windows)
    h = _embeddings(b, arch, family, weights)
    x, residual = _norm(b, "/model/layers.0/input_layernorm", family, weights.layers[0].attn_norm, h)
    layer_inputs = []  # (batch, seq, hidden): the residual stream entering each layer
    rope_tables = _rope_tables(weights, contract.spare_rows)
    for i, layer in enumerate(weights.layers):
        prefix = f"/model/layers.{i}"
        layer_inputs.append(residual)
        a = _attention(b, i, arch, family, layer, attention, x, rope_tables)
        a, o_bias = _sandwich(b, f"{prefix}/post_attention_layernorm", family, layer.attn_out_norm, a, layer.o)
        mlp_norm = "pre_feedforward_layernorm" if family.sandwich_norms else "post_attention_layernorm"
        x, residual = _skip_norm(b, f"{prefix}/{mlp_norm}", family, layer.mlp_norm, a, residual, o_bias)
        h = _mlp(b, f"{prefix}/mlp", family, layer, x)
        h, down_bias = _sandwich(b, f"{prefix}/post_feedforward_layernorm", family, layer.mlp_out_norm, h, layer.down)
        if i + 1 < len(weights.layers):
            x, residual = _skip_norm(b, f"/model/layers.{i + 1}/input_layernorm", family,
                                     weights.layers[i + 1].attn_norm, h, residual, down_bias)
    x, _ = _skip_norm(b, "/model/norm", family, weights.final_norm, h, residual, down_bias)
    logits = _lm_head(b, family, weights, x, head, float_dtype)
    if contract.has_next_tokens:
        _next_tokens(b, logits)
    if contract.top_k:
        top_tokens(b, logits, contract.top_k)
    b.rename_output(logits, LOGITS)
    if contract.feature_layers:
        _features(b, [layer_inputs[k] for k in contract.feature_layers], float_dtype)
    return b.model(contract.inputs, contract.outputs, graph_opset(arch, opset))


def _next_tokens(b: GraphBuilder, logits: str) -> None:
    """logits (batch, seq, vocab) -ArgMax-> next_tokens (batch, seq) int64: the first maximum, as numpy's argmax."""
    tokens = b.op1("ArgMax", [logits], "/lm_head/ArgMax", axis=-1, keepdims=0, select_last_index=0)
    b.rename_output(tokens, NEXT_TOKENS)


def top_tokens(b: GraphBuilder, logits: str, k: int) -> None:
    """logits (batch, seq, vocab) -Softmax-TopK(k)-> top_probs, top_tokens (batch, seq, k): a draft's proposals,
    most likely first (ties: the lower token id first, as a stable sort)."""
    probs = b.op1("Softmax", [logits], "/lm_head/Softmax", axis=-1)
    values, indices = b.op("TopK", [probs, b.constant("/lm_head/top_k", np.array([k], np.int64))], "/lm_head/TopK",
                           outputs=2, axis=-1, largest=1, sorted=1)
    b.rename_output(values, TOP_PROBS)
    b.rename_output(indices, TOP_TOKENS)


def _features(b: GraphBuilder, layer_inputs: list[str], float_dtype: str) -> None:
    """The feature draft's input: the chosen layers' inputs side by side, (batch, seq, layers * hidden) float32."""
    features = b.op1("Concat", layer_inputs, "/model/features/Concat", axis=-1)
    if float_dtype != "float32":
        features = b.op1("Cast", [features], "/model/features/Cast", to=TensorProto.FLOAT)
    b.rename_output(features, FEATURES)


def attention_inputs(b: GraphBuilder, arch: ArchitectureSpec, contract: GraphContract,
                     windows: tuple[int, ...] = ()) -> _Attention:
    """The graph-level tensors every layer's attention reads, as the contract shapes them: static (a capacity-wide
    mask, ``past_length``) or as wide as the pass, with the dummy attention row where ``padded_attention``. Both need
    GroupQueryAttention."""
    if (contract.static_shapes or contract.padded_attention) and not uses_gqa(arch):
        raise ValueError(f"static-shape graphs and padded attention need GroupQueryAttention (head_dim "
                         f"{arch.head_dim} is not a multiple of {GQA_HEAD_MULTIPLE})")
    if contract.static_shapes:
        attention = _static_attention_inputs(b, contract.kv_dtype, windows)
    else:
        attention = _attention_inputs(b, contract.kv_dtype, windows, committed_length=not uses_gqa(arch))
    return _pad_attention(b, attention) if contract.padded_attention else attention


def _attention_inputs(b: GraphBuilder, float_dtype: str, windows: tuple[int, ...] = (),
                      committed_length: bool = False) -> _Attention:
    """tree_mask (batch, 1, seq, total) bool -> additive bias, seqlens_k = total - 1 per batch row, total length;
    one bias per sliding window; and where asked (or windows need it) the committed length."""
    zero, blocked, bias, total, total32 = _mask_bias(b, float_dtype)  # total: past + seq
    last = b.op1("Sub", [total32, b.constant("/model/constants/one_i32", np.array(1, np.int32))],
                 "/model/attn_mask/seqlens_k/Sub")
    batch = b.op1("Shape", [INPUT_IDS], "/model/attn_mask/batch/Shape", end=1)  # (1,)
    seqlens = b.op1("Expand", [last, batch], "/model/attn_mask/seqlens_k/Expand")  # (batch,) int32
    if not (windows or committed_length):
        return _Attention(bias, seqlens, total32, {})
    seq = b.op1("Shape", [INPUT_IDS], "/model/attn_mask/seq/Shape", start=1, end=2)  # (1,)
    past = b.op1("Sub", [total, seq], "/model/attn_mask/past/Sub")  # (1,) int64: committed rows
    past_length = b.op1("Expand", [past, batch], "/model/attn_mask/past/Expand")  # (batch,)
    window_bias = {}
    if windows:
        distance = _query_key_distance(b, past, batch)
        window_bias = {w: _window_bias(b, w, distance, zero, blocked) for w in windows}
    return _Attention(bias, seqlens, total32, window_bias, past_length, past)


def _mask_bias(b: GraphBuilder, float_dtype: str) -> tuple[str, str, str, str, str]:
    """tree_mask -Where(0, the dtype's minimum)-> additive bias; the mask's width as int64 and int32.
    Returns (zero, blocked, bias, width, width32)."""
    zero = b.weight("/model/constants/zero", np.zeros((), np.float32))
    blocked = b.weight("/model/constants/blocked", lowest(float_dtype))
    bias = b.op1("Where", [TREE_MASK, zero, blocked], "/model/attn_mask/Where")  # (batch, 1, seq, width)
    mask_shape = b.op1("Shape", [TREE_MASK], "/model/attn_mask/Shape")
    width = b.op1("Gather", [mask_shape, b.constant("/model/constants/axis_total", np.array(MASK_AXIS_TOTAL))],
                  "/model/attn_mask/total/Gather")  # () int64
    width32 = b.op1("Cast", [width], "/model/attn_mask/total/Cast", to=TensorProto.INT32)
    return zero, blocked, bias, width, width32


def _pad_attention(b: GraphBuilder, a: _Attention) -> _Attention:
    """Attention over one dummy row more where a pass has one row (``contract.padded_attention``): ONNX Runtime's
    CPU GroupQueryAttention computes probabilities x V with MLAS's one-row GEMM kernel for a one-row call, ~1e-7
    from what a multi-row call gives the same row, which int8-activation matmuls amplify to ~1 logit; with a dummy
    row no call has one row, so a chain pass gives each row what one-token steps give it, bit for bit, and the rest
    of the graph (row-consistent MatMulNBits at blocks up to 32) still runs the pass's own rows::

        extra = max(2 - seq, 0)                                   1 for a one-token step, else 0
        bias (batch, 1, seq, total) -Pad(blocked: extra rows and columns)-> (batch, 1, seq + extra, total + extra)
        seqlens_k + extra, total + extra;  position_ids -Pad(edge: extra)-> (batch, seq + extra)
        per layer: q[, k, v] -Pad(extra zero rows)-> GroupQueryAttention -Slice(rows [0, seq))-> out

    The dummy row attends to nothing real (its own column is blocked too: its output is discarded) and no real row
    attends to it; its K/V land in the cache row after the pass (a spare row: ``contract.spare_rows``), which the
    next pass overwrites."""
    rows = b.op1("Shape", [INPUT_IDS], "/model/attn_pad/rows/Shape", start=1, end=2)  # (1,) int64
    extra = b.op1("Max", [b.op1("Sub", [b.constant("/model/attn_pad/two", np.array([2], np.int64)), rows],
                                "/model/attn_pad/extra/Sub"),
                          b.constant("/model/attn_pad/zero", np.array([0], np.int64))], "/model/attn_pad/extra/Max")
    blocked = "/model/constants/blocked"
    bias_pads = b.op1("Concat", [b.constant("/model/attn_pad/bias_pads_head", np.zeros(6, np.int64)), extra, extra],
                      "/model/attn_pad/bias_pads/Concat", axis=0)  # (8,): rows and columns at the end
    row_pads = b.op1("Concat", [b.constant("/model/attn_pad/row_pads_head", np.zeros(4, np.int64)), extra,
                                b.constant("/model/attn_pad/row_pads_tail", np.zeros(1, np.int64))],
                     "/model/attn_pad/row_pads/Concat", axis=0)  # (6,): (batch, seq, width) rows at the end

    def pad_bias(name: str, bias: str) -> str:
        return b.op1("Pad", [bias, bias_pads, blocked], f"/model/attn_pad/{name}/Pad")

    extra32 = b.op1("Cast", [extra], "/model/attn_pad/extra/Cast", to=TensorProto.INT32)  # (1,)
    position_pads = b.op1("Concat", [b.constant("/model/attn_pad/position_pads_head", np.zeros(3, np.int64)), extra],
                          "/model/attn_pad/position_pads/Concat", axis=0)  # (4,): (batch, seq) rows at the end
    total = b.op1("Add", [a.total_length, b.op1("Squeeze", [extra32], "/model/attn_pad/extra/Squeeze")],
                  "/model/attn_pad/total/Add")  # () int32
    return replace(a, bias=pad_bias("bias", a.bias),
                   window_bias={w: pad_bias(f"window_{w}", bias) for w, bias in a.window_bias.items()},
                   seqlens_k=b.op1("Add", [a.seqlens_k, extra32], "/model/attn_pad/seqlens_k/Add"),
                   total_length=total,
                   positions=b.op1("Pad", [POSITION_IDS, position_pads], "/model/attn_pad/positions/Pad",
                                   mode="edge"),  # the dummy takes the last row's position (its q/k/v are zeros)
                   pad=_AttentionPad(row_pads, rows))


def _static_attention_inputs(b: GraphBuilder, float_dtype: str, windows: tuple[int, ...]) -> _Attention:
    """Static shapes (a CUDA graph replays fixed shapes only): tree_mask (batch, 1, seq, capacity) -> bias as wide as
    the cache; total_sequence_length = capacity; seqlens_k = past_length + seq - 1 per batch row, from the input.
    GroupQueryAttention attends to rows [0, seqlens_k] of each row's cache; the bias masks the rest of the width.

        past_length (batch,) + Shape(input_ids)[1] - 1 -Cast-> seqlens_k (batch,) int32
        Shape(tree_mask)[3] -Cast-> total (capacity) int32
    """
    zero, blocked, bias, width, total32 = _mask_bias(b, float_dtype)  # width: the capacity
    seq = b.op1("Shape", [INPUT_IDS], "/model/attn_mask/seq/Shape", start=1, end=2)  # (1,)
    end = b.op1("Add", [PAST_LENGTH, seq], "/model/attn_mask/seqlens_k/Add")  # (batch,) int64: past + seq
    last = b.op1("Sub", [end, b.constant("/model/constants/one_i64", np.array(1, np.int64))],
                 "/model/attn_mask/seqlens_k/Sub")
    seqlens = b.op1("Cast", [last], "/model/attn_mask/seqlens_k/Cast", to=TensorProto.INT32)  # (batch,) int32
    window_bias = {}
    if windows:
        distance = _static_query_key_distance(b, width, seq)
        window_bias = {w: _window_bias(b, w, distance, zero, blocked) for w in windows}
    return _Attention(bias, seqlens, total32, window_bias)


def _static_query_key_distance(b: GraphBuilder, width: str, seq: str) -> str:
    """pos(query) - pos(key), (batch, 1, seq, capacity), every shape fixed: column j holds row j's position (j for
    committed rows, position_ids[j - past] for this pass's rows; the rest is masked anyway).

        j = Range(capacity); i = j - past_length[:, None]; in_pass = 0 <= i < seq
        keys = Where(in_pass, GatherElements(position_ids, Clip(i, 0, seq - 1)), j)     (batch, capacity)
    """
    p = "/model/attn_mask/distance"
    zero, one = b.constant("/model/constants/zero_i64", np.array(0, np.int64)), "/model/constants/one_i64"
    columns = b.op1("Range", [zero, width, one], f"{p}/columns/Range")  # (capacity,)
    past = b.op1("Unsqueeze", [PAST_LENGTH, b.constant("/model/constants/axes_1", np.array([1], np.int64))],
                 f"{p}/past/Unsqueeze")  # (batch, 1)
    offset = b.op1("Sub", [columns, past], f"{p}/offset/Sub")  # (batch, capacity)
    seq_scalar = b.op1("Squeeze", [seq], f"{p}/seq/Squeeze")
    inside = b.op1("And", [b.op1("GreaterOrEqual", [offset, zero], f"{p}/GreaterOrEqual"),
                           b.op1("Less", [offset, seq_scalar], f"{p}/Less")], f"{p}/And")
    last = b.op1("Sub", [seq_scalar, one], f"{p}/last/Sub")
    index = b.op1("Clip", [offset, zero, last], f"{p}/Clip")
    gathered = b.op1("GatherElements", [POSITION_IDS, index], f"{p}/GatherElements", axis=1)  # (batch, capacity)
    keys = b.op1("Where", [inside, gathered, columns], f"{p}/keys/Where")
    keys = b.op1("Unsqueeze", [keys, b.constant("/model/constants/axes_1_2", np.array([1, 2], np.int64))],
                 f"{p}/keys/Unsqueeze")  # (batch, 1, 1, capacity)
    queries = b.op1("Unsqueeze", [POSITION_IDS, b.constant("/model/constants/axes_1_3", np.array([1, 3], np.int64))],
                    f"{p}/queries/Unsqueeze")  # (batch, 1, seq, 1)
    return b.op1("Sub", [queries, keys], f"{p}/Sub")


def _query_key_distance(b: GraphBuilder, past: str, batch: str) -> str:
    """pos(query) - pos(key), (batch, 1, seq, total): committed rows sit at their row index, this pass's rows at
    their tree positions.

        Range(past) -Expand-> (batch, past) -Concat(position_ids)-> keys (batch, total)
        position_ids[:, None, :, None] - keys[:, None, None, :]
    """
    p = "/model/attn_mask/distance"
    stop = b.op1("Squeeze", [past], f"{p}/rows/Squeeze")  # () int64
    rows = b.op1("Range", [b.constant("/model/constants/zero_i64", np.array(0, np.int64)), stop,
                           b.constant("/model/constants/one_i64", np.array(1, np.int64))], f"{p}/rows/Range")
    shape = b.op1("Concat", [batch, past], f"{p}/rows/Concat", axis=0)
    committed = b.op1("Expand", [rows, shape], f"{p}/rows/Expand")  # (batch, past)
    keys = b.op1("Concat", [committed, POSITION_IDS], f"{p}/keys/Concat", axis=1)  # (batch, total)
    keys = b.op1("Unsqueeze", [keys, b.constant("/model/constants/axes_1_2", np.array([1, 2], np.int64))],
                 f"{p}/keys/Unsqueeze")  # (batch, 1, 1, total)
    queries = b.op1("Unsqueeze", [POSITION_IDS, b.constant("/model/constants/axes_1_3", np.array([1, 3], np.int64))],
                    f"{p}/queries/Unsqueeze")  # (batch, 1, seq, 1)
    return b.op1("Sub", [queries, keys], f"{p}/Sub")


def _window_bias(b: GraphBuilder, window: int, distance: str, zero: str, blocked: str) -> str:
    """The tree bias with a sliding window: a query sees a key only if pos(query) - pos(key) < window."""
    prefix = f"/model/attn_mask/window_{window}"
    near = b.op1("Less", [distance, b.constant(f"/model/constants/window_{window}", np.array(window, np.int64))],
                 f"{prefix}/Less")
    allowed = b.op1("And", [TREE_MASK, near], f"{prefix}/And")
    return b.op1("Where", [allowed, zero, blocked], f"{prefix}/Where")


def _embeddings(b: GraphBuilder, arch: ArchitectureSpec, family: DecoderFamily, weights: DecoderWeights) -> str:
    """input_ids (batch, seq) -> hidden (batch, seq, hidden), scaled (gemma), plus learned positions where the family
    has them."""
    embed = b.weight("model.embed_tokens.weight", weights.embed)
    h = b.op1("Gather", [embed, INPUT_IDS], "/model/embed_tokens/Gather")
    if family.embed_scale != 1.0:
        scale = b.weight("model.embed_tokens.scale", np.array(family.embed_scale, np.float32))
        h = b.op1("Mul", [h, scale], "/model/embed_tokens/Mul")
    if arch.position_encoding == "learned":
        table = b.weight("model.embed_positions.weight", weights.pos_embed)
        pos = b.op1("Gather", [table, POSITION_IDS], "/model/embed_positions/Gather")
        h = b.op1("Add", [h, pos], "/model/embeddings/Add")
    return h


def _plain_norm(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm, x: str) -> str:
    """RMSNorm or LayerNorm over the last axis, no residual."""
    gamma = b.weight(_param(prefix, "weight"), norm.weight)
    if family.norm == "rms":
        return b.op1("SimplifiedLayerNormalization", [x, gamma], f"{prefix}/SimplifiedLayerNorm", axis=-1,
                     epsilon=family.norm_eps, stash_type=1)
    beta = b.weight(_param(prefix, "bias"), norm.bias)
    return b.op1("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNorm", axis=-1, epsilon=family.norm_eps,
                 stash_type=1)


def _norm(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm, x: str) -> tuple[str, str]:
    """The first layer's norm (no skip input); returns (normed, residual = x)."""
    return _plain_norm(b, prefix, family, norm, x), x


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


def _sandwich(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm | None, x: str,
              projection: Linear) -> tuple[str, np.ndarray | None]:
    """A sandwich family's output norm (x + bias normed before the residual); returns (x, the bias still owed to the
    next SkipNorm). Without one: x untouched, its projection's bias owed."""
    if norm is None:
        return x, projection.bias
    if projection.bias is not None:
        x = b.op1("Add", [x, b.weight(_param(prefix, "input_bias"), projection.bias)], f"{prefix}/Add")
    return _plain_norm(b, prefix, family, norm, x), None


def _linear(b: GraphBuilder, prefix: str, linear: Linear, x: str, with_bias: bool = True) -> str:
    out = b.op1("MatMul", [x, b.weight(_param(prefix, "weight"), linear.weight)], f"{prefix}/MatMul")
    if with_bias and linear.bias is not None:
        out = b.op1("Add", [out, b.weight(_param(prefix, "bias"), linear.bias)], f"{prefix}/Add")
    return out


RopeTables = dict[str, tuple[np.ndarray, np.ndarray]]


def _rope_tables(weights: DecoderWeights, spare_rows: int = 0) -> RopeTables:
    """The rotary tables by name; ``spare_rows`` more rows (copies of the last): GroupQueryAttention wants a table
    as long as its total length, which a padded pass (``contract.min_rows``) makes longer than the context at its
    end (dummy rows take the root's position, so no row reads the copies)."""
    tables = {}
    if weights.rope_cos is not None:
        tables[GLOBAL_ROPE] = (weights.rope_cos, weights.rope_sin)
    if weights.rope_local_cos is not None:
        tables[LOCAL_ROPE] = (weights.rope_local_cos, weights.rope_local_sin)
    if spare_rows:
        tables = {name: tuple(np.concatenate([t, np.repeat(t[-1:], spare_rows, axis=0)]) for t in pair)
                  for name, pair in tables.items()}
    return tables


def _attention(b: GraphBuilder, i: int, arch: ArchitectureSpec, family: DecoderFamily, layer: LayerWeights,
               attention: _Attention, x: str, tables: RopeTables) -> str:
    """Packed QKV, q/k norms, rotary with the tree's positions, attention over the static cache with the tree (and
    window) bias, output projection.

        x -> MatMul(qkv) [+bias] -> qkv                     (batch, seq, (heads + 2 kv_heads) * hd), packed
        GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, total, cos, sin, position_ids, attention_bias)
            rotary inside the kernel at position_ids (tree positions, not seqlens) where it can (full rotary,
            head_dim % 16 == 0, no q/k norms); otherwise Split -> [SimplifiedLayerNorm per head (q, k)] ->
            RotaryEmbedding(q), RotaryEmbedding(k) [partial: rotary_embedding_dim] -> attention(q, k, v)
            -> (batch, seq, heads*hd); present_k/v written in place at rows [total - seq, total)
            head sizes GroupQueryAttention refuses: TensorScatter(k, v into the cache) -> Attention (ONNX op)
        -> MatMul(o_proj)                                   its bias goes to the next SkipNorm
    """
    prefix = f"/model/layers.{i}"
    kind = family.layer(i)
    qkv = _linear(b, f"{prefix}/attn/qkv_proj", layer.qkv, x)
    rope = _rope_inputs(b, arch, kind, tables)
    fused_rotary = (rope is not None and uses_gqa(arch) and not family.qk_norm
                    and arch.head_dim % ROTARY_IN_ATTENTION_MULTIPLE == 0
                    and family.rotary_dim in (None, arch.head_dim))
    if fused_rotary or (rope is None and uses_gqa(arch) and not family.qk_norm):
        q, k, v = qkv, "", ""
    else:
        q, k, v = _split_qkv(b, prefix, arch, qkv)
        if family.qk_norm:
            q = _head_norm(b, f"{prefix}/attn/q_norm", family, layer.q_norm, q, arch.num_heads, arch.head_dim)
            k = _head_norm(b, f"{prefix}/attn/k_norm", family, layer.k_norm, k, arch.num_kv_heads, arch.head_dim)
        if rope is not None:
            q = _rotary(b, f"{prefix}/attn/q_rotary", family, q, rope, arch.num_heads)
            k = _rotary(b, f"{prefix}/attn/k_rotary", family, k, rope, arch.num_kv_heads)
    bias = attention.bias_for(kind)
    scale = float(family.attn_scale if family.attn_scale is not None else arch.head_dim ** -0.5)
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    if uses_gqa(arch):
        cos, sin = rope if fused_rotary and rope is not None else ("", "")
        pad = attention.pad
        if pad:  # a one-row pass: one zero row more (_pad_attention)
            q, k, v = (b.op1("Pad", [t, pad.row_pads], f"{prefix}/attn/pad_{name}/Pad") if t else t
                       for name, t in (("q", q), ("k", k), ("v", v)))
        out, present_k, present_v = b.op(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, attention.seqlens_k, attention.total_length, cos, sin,
             attention.positions if fused_rotary else "", bias],
            f"{prefix}/attn/GroupQueryAttention", outputs=3, domain=MS_DOMAIN, num_heads=arch.num_heads,
            kv_num_heads=arch.num_kv_heads, scale=scale, softcap=float(family.attn_softcap),
            do_rotary=int(fused_rotary), rotary_interleaved=0)
        if pad:  # (batch, seq + extra, heads * hd) -> the pass's rows
            out = b.op1("Slice", [out, _shared_const(b, "/model/constants/zero_1", np.array([0], np.int64)), pad.rows,
                                  _shared_const(b, "/model/constants/seq_axis", np.array([1], np.int64))],
                        f"{prefix}/attn/pad/Slice")
    else:
        out, present_k, present_v = _onnx_attention(b, prefix, arch, family, attention, q, k, v, past_k, past_v,
                                                    bias, scale)
    b.rename_output(present_k, f"present.{i}.key")
    b.rename_output(present_v, f"present.{i}.value")
    return _linear(b, f"{prefix}/attn/o_proj", layer.o, out, with_bias=False)


def _rope_inputs(b: GraphBuilder, arch: ArchitectureSpec, kind: LayerKind,
                 tables: RopeTables) -> tuple[str, str] | None:
    """The layer's (cos, sin) cache initializers, or None for a layer without rotary positions."""
    if arch.position_encoding != "rope" or kind.rope is None:
        return None
    if kind.rope not in tables:
        raise ValueError(f"the {kind.rope} rotary table is required for this layer")
    cos, sin = tables[kind.rope]
    name = "model.rotary" if kind.rope == GLOBAL_ROPE else f"model.rotary_{kind.rope}"
    return _shared_weight(b, f"{name}.cos_cache", cos), _shared_weight(b, f"{name}.sin_cache", sin)


def _split_qkv(b: GraphBuilder, prefix: str, arch: ArchitectureSpec, qkv: str) -> tuple[str, str, str]:
    q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    sizes = b.constant(_param(prefix, "attn.qkv_sizes"), np.array([q_size, kv_size, kv_size], np.int64))
    q, k, v = b.op("Split", [qkv, sizes], f"{prefix}/attn/qkv_proj/Split", outputs=3, axis=-1)
    return q, k, v


def _head_norm(b: GraphBuilder, prefix: str, family: DecoderFamily, norm: Norm | None, x: str, heads: int,
               head_dim: int) -> str:
    """Per-head RMSNorm: (batch, seq, heads * hd) -Reshape-> (batch, seq, heads, hd) -Norm-> -Reshape-> back."""
    if norm is None:
        raise ValueError(f"{prefix}: q/k norm weights are required for this family")
    split = b.constant(_param(prefix, "head_shape"), np.array([0, 0, heads, head_dim], np.int64))
    merged = b.constant(_param(prefix, "flat_shape"), np.array([0, 0, heads * head_dim], np.int64))
    heads_x = b.op1("Reshape", [x, split], f"{prefix}/Reshape")
    normed = _plain_norm(b, prefix, family, norm, heads_x)
    return b.op1("Reshape", [normed, merged], f"{prefix}/Reshape_1")


def _rotary(b: GraphBuilder, prefix: str, family: DecoderFamily, x: str, rope: tuple[str, str], heads: int) -> str:
    """RotaryEmbedding over (batch, seq, heads * hd) at the tree's positions; partial rotary rotates the leading
    ``rotary_dim`` dims of each head."""
    partial = {"rotary_embedding_dim": family.rotary_dim} if family.rotary_dim else {}
    return b.op1("RotaryEmbedding", [x, POSITION_IDS, *rope], f"{prefix}/RotaryEmbedding", domain=MS_DOMAIN,
                 num_heads=heads, interleaved=0, **partial)


def _onnx_attention(b: GraphBuilder, prefix: str, arch: ArchitectureSpec, family: DecoderFamily,
                    attention: _Attention, q: str, k: str, v: str, past_k: str, past_v: str, bias: str,
                    scale: float) -> tuple[str, str, str]:
    """Attention for head sizes GroupQueryAttention refuses, same contract (static cache written in place)::

        q, k, v (batch, seq, heads * hd) -Reshape-Transpose-> (batch, heads, seq, hd)
        TensorScatter(past_k, k, write_indices = committed length) -> present_k   (the same buffer, in place)
        Concat(Slice(past_k, rows [0, past)), k) -> keys (batch, kv_heads, total, hd); values alike
        (read from the input, not from TensorScatter's output: ORT 1.31 fails a Slice of that output)
        Attention(q, keys, values, bias; q_num_heads, kv_num_heads, scale, softcap) -> (batch, heads, seq, hd)
        -Transpose-Reshape-> (batch, seq, heads * hd)
    """
    p = f"{prefix}/attn"
    q4 = _to_heads(b, f"{p}/q", q, arch.num_heads, arch.head_dim)
    presents, cached = [], []
    for name, x, past in (("k", k, past_k), ("v", v, past_v)):
        x4 = _to_heads(b, f"{p}/{name}", x, arch.num_kv_heads, arch.head_dim)  # (batch, kv_heads, seq, hd)
        presents.append(b.op1("TensorScatter", [past, x4, attention.past_length], f"{p}/{name}_cache/TensorScatter",
                              axis=KV_AXIS))  # the cache, this pass's rows written at [past, total)
        committed = b.op1("Slice", [past, _shared_const(b, "/model/constants/zero_1", np.array([0], np.int64)),
                                    attention.rows_past, _shared_const(b, "/model/constants/kv_axis",
                                                                       np.array([KV_AXIS], np.int64))],
                          f"{p}/{name}_cache/Slice")  # (batch, kv_heads, past, hd)
        cached.append(b.op1("Concat", [committed, x4], f"{p}/{name}_cache/Concat", axis=KV_AXIS))  # (.., total, hd)
    out = b.op1("Attention", [q4, cached[0], cached[1], bias], f"{p}/Attention", q_num_heads=arch.num_heads,
                kv_num_heads=arch.num_kv_heads, scale=scale, softcap=float(family.attn_softcap))
    out = b.op1("Transpose", [out], f"{p}/out/Transpose", perm=[0, 2, 1, 3])  # (batch, seq, heads, hd)
    flat = _shared_const(b, f"/model/constants/flat_{arch.num_heads * arch.head_dim}",
                         np.array([0, 0, arch.num_heads * arch.head_dim], np.int64))
    return b.op1("Reshape", [out, flat], f"{p}/out/Reshape"), presents[0], presents[1]


def _to_heads(b: GraphBuilder, prefix: str, x: str, heads: int, head_dim: int) -> str:
    """(batch, seq, heads * hd) -> (batch, heads, seq, hd)."""
    shape = _shared_const(b, f"/model/constants/heads_{heads}x{head_dim}", np.array([0, 0, heads, head_dim], np.int64))
    x = b.op1("Reshape", [x, shape], f"{prefix}/Reshape")
    return b.op1("Transpose", [x], f"{prefix}/Transpose", perm=[0, 2, 1, 3])


def _mlp(b: GraphBuilder, prefix: str, family: DecoderFamily, layer: LayerWeights, x: str) -> str:
    """swiglu: MatMul(gate), MatMul(up) -> QuickGelu(gate, 1) * up -> MatMul(down)
    geglu_tanh: the same with FastGelu(gate) (gemma)
    gelu_tanh: MatMul(fc) -> FastGelu(+bias) -> MatMul(proj); down's bias goes to the next SkipNorm."""
    if family.mlp in ("swiglu", "geglu_tanh"):
        if layer.gate is None:
            raise ValueError(f"a {family.mlp} MLP needs gate weights")
        gate = _linear(b, f"{prefix}/gate_proj", layer.gate, x)
        up = _linear(b, f"{prefix}/up_proj", layer.up, x)
        if family.mlp == "swiglu":
            act = b.op1("QuickGelu", [gate], f"{prefix}/act_fn/QuickGelu", domain=MS_DOMAIN, alpha=SILU_ALPHA)
        else:
            act = b.op1("FastGelu", [gate], f"{prefix}/act_fn/FastGelu", domain=MS_DOMAIN)
        h = b.op1("Mul", [act, up], f"{prefix}/Mul")
    else:
        fc = _linear(b, f"{prefix}/fc", layer.up, x, with_bias=False)
        inputs = [fc] + ([b.weight(_param(prefix, "fc.bias"), layer.up.bias)] if layer.up.bias is not None else [])
        h = b.op1("FastGelu", inputs, f"{prefix}/act_fn/FastGelu", domain=MS_DOMAIN)
    return _linear(b, f"{prefix}/down_proj", layer.down, h, with_bias=False)


def _lm_head(b: GraphBuilder, family: DecoderFamily, weights: DecoderWeights, x: str, head: HeadKind,
             float_dtype: str) -> str:
    """x (batch, seq, hidden) -> logits (batch, seq, vocab) float32 [final softcap: cap * tanh(logits / cap)].

    A tied head reads the embedding table itself (FusedMatMul, transB) unless ``head="own"`` asks for a transposed
    copy, which MatMulNBits can quantize."""
    if weights.lm_head is not None:
        logits = b.op1("MatMul", [x, b.weight("lm_head.weight", weights.lm_head)], "/lm_head/MatMul")
    elif head == "own":
        logits = b.op1("MatMul", [x, b.weight("lm_head.weight", weights.embed.T)], "/lm_head/MatMul")
    else:
        logits = b.op1("FusedMatMul", [x, "model.embed_tokens.weight"], "/lm_head/FusedMatMul", domain=MS_DOMAIN,
                       transB=1)
    if family.final_softcap:
        cap = b.weight("lm_head.softcap", np.array(family.final_softcap, np.float32))
        logits = b.op1("Div", [logits, cap], "/lm_head/softcap/Div")
        logits = b.op1("Tanh", [logits], "/lm_head/softcap/Tanh")
        logits = b.op1("Mul", [logits, cap], "/lm_head/softcap/Mul")
    if float_dtype != "float32":
        logits = b.op1("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
    return logits


def _shared_weight(b: GraphBuilder, name: str, array: np.ndarray | None) -> str:
    if array is None:
        raise ValueError(f"{name} is required for this position encoding")
    return name if b.has(name) else b.weight(name, array)


def _shared_const(b: GraphBuilder, name: str, array: np.ndarray) -> str:
    return name if b.has(name) else b.constant(name, array)


def _param(prefix: str, suffix: str) -> str:
    """Initializer name from a node prefix: /model/layers.0/attn/qkv_proj + weight -> model.layers.0.attn.qkv_proj.weight"""
    return f"{prefix[1:].replace('/', '.')}.{suffix}"

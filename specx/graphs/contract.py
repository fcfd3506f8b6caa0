"""The typed I/O contract of every graph specx exports.

The exporter writes a contract into the ONNX metadata and into the bundle manifest; the runtime rebuilds it from the
manifest and checks each loaded session against it. Names follow optimum's so that files interoperate:
``past_key_values.{i}.key`` in, ``present.{i}.key`` out.

Decoder graph (target and draft)::

    input_ids      int64  (batch, seq)                  tokens of this pass (a prompt chunk or a token tree)
    position_ids   int64  (batch, seq)                  absolute positions (committed length + tree depth)
    tree_mask      bool   (batch, 1, seq, total)        True where new token i may attend to position j,
                                                        total = past + seq (cached positions first); the graph
                                                        reads the committed length (past) from this shape
    static-shape graphs (CUDA graphs replay fixed shapes only):
    tree_mask      bool   (batch, 1, seq, capacity)     as wide as the cache; columns past the pass are False
    past_length    int64  (batch,)                      the committed length, as a tensor
    past_key_values.{i}.key / .value
                   kv     (batch, kv_heads, capacity, head_dim)   the static cache: rows [0, past) are committed
    ->
    logits         float32 (batch, seq, vocab)
    next_tokens    int64   (batch, seq)                 argmax of each row's logits, computed in the graph: all that
                                                        greedy decoding brings back from the device (graphs exported
                                                        before it lack it: the runtime then takes the logits)
    top_tokens     int64   (batch, seq, k)              drafts only: each row's k most likely tokens, most likely
    top_probs      float32 (batch, seq, k)              first, and their probabilities (softmax of the logits)
    features       float32 (batch, seq, width)          only where ``feature_layers`` is set (a target with a feature
                                                        draft): the inputs of those layers side by side
    present.{i}.key / .value
                   kv     (batch, kv_heads, capacity, head_dim)   the same buffer (bound as input and output):
                                                                  this pass's K/V written in place at [past, total)
    ``padded_attention`` (targets whose quantized matmuls compute in int8, at blocks whose rows are computed alike):
    the graph runs attention on one dummy row more than the pass, so that no call is a one-row call; ``min_rows``
    (2 where the graph does not) and ``row_multiple`` (2 where the matmul kernels also compute an odd last row
    apart): the runtime pads a pass to at least min_rows rows, a multiple of row_multiple, with dummy rows (never
    committed); the cache and rotary tables hold ``spare_rows`` rows more for either

Feature draft graph (one decoder layer that reads the target's features, EAGLE-style)::

    input_ids, position_ids, tree_mask, past_key_values.0.key / .value     as above (one layer)
    features       float32 (batch, feature_rows, width)   target features, for the first feature_rows tokens
    hidden         float32 (batch, hidden_rows, hidden)   the draft's own hidden states, for the rest
                                                          (feature_rows + hidden_rows = seq; either may be 0)
    ->
    logits         float32 (batch, seq, draft_vocab)      over the draft's reduced vocabulary (a map gives target ids)
    hidden_states  float32 (batch, seq, hidden)           fed back as ``hidden`` for the tokens below each node
    present.0.key / .value

KV-commit helper graph (moves accepted rows into place, on the device, in place)::

    past_key_values.{i}.key / .value  kv (batch, kv_heads, capacity, head_dim)   bound as input and output
    src                               int64 (moved,)    rows to keep, in order
    dst                               int64 (batch,)    first row they move to (rows dst .. dst + moved - 1)
    ->
    present.{i}.key / .value          kv (batch, kv_heads, capacity, head_dim)   = Gather(src) scattered at dst
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Protocol, Sequence

from specx.errors import ContractError

CONTRACT_VERSION = 2
EXACT_MIN_ROWS = 2  # passes of a quantized CPU target: ONNX Runtime's one-row kernels differ from multi-row ones
EXACT_ROW_MULTIPLE = 2  # ... and where MatMulNBits computes an odd last row with its one-row kernel (blocks > 32)
METADATA_KEY = "specx.contract"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
TREE_MASK = "tree_mask"
LOGITS = "logits"
NEXT_TOKENS = "next_tokens"
TOP_TOKENS, TOP_PROBS = "top_tokens", "top_probs"
PAST_LENGTH = "past_length"
DRAFT_TOP_K = 8  # a draft graph's top tokens per row, computed in the graph: enough for trees up to 8 wide
COMMIT_SRC = "src"
COMMIT_DST = "dst"
FEATURES = "features"
HIDDEN = "hidden"
HIDDEN_STATES = "hidden_states"
DECODER, FEATURE_DRAFT, KV_COMMIT = "decoder", "feature_draft", "kv_commit"

KV_DTYPES = ("float32", "float16", "bfloat16")

Dim = str | int


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, bool, float32, float16
    shape: tuple[Dim, ...]  # str = symbolic dimension, int = fixed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


class NodeArgLike(Protocol):
    """What onnxruntime's NodeArg offers (name, 'tensor(float)' type, shape)."""

    name: str
    type: str
    shape: Sequence[Any]


@dataclass(frozen=True)
class GraphContract:
    kind: str  # "decoder" | "feature_draft" | "kv_commit"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # logits width: the target vocabulary, or a feature draft's reduced one
    kv_dtype: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    feature_layers: tuple[int, ...] = ()  # decoder: the layers whose inputs the features output holds
    feature_width: int = 0  # width of the features output (decoder) or input (feature draft)
    hidden_size: int = 0  # feature draft: width of its hidden input and hidden_states output
    min_rows: int = 1  # decoder: the fewest rows a pass computes exactly; shorter passes are padded (module doc)
    row_multiple: int = 1  # decoder: passes are padded to a multiple of this many rows (module doc)
    padded_attention: bool = False  # decoder: attention runs one dummy row more, inside the graph (module doc)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def decoder(cls, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int, kv_dtype: str,
                feature_layers: tuple[int, ...] = (), hidden_size: int = 0, top_k: int = 0,
                static_shapes: bool = False, min_rows: int = 1, row_multiple: int = 1,
                padded_attention: bool = False) -> "GraphContract":
        """``feature_layers`` (with the model's ``hidden_size``) adds the features output a feature draft reads;
        ``top_k`` (drafts) the top tokens and probabilities of each row; ``static_shapes`` a capacity-wide mask and
        the committed length as an input (the shapes a CUDA graph can replay); ``min_rows`` and ``row_multiple``
        the rows the runtime pads a pass to, ``padded_attention`` the graph's own dummy attention row (see the
        module doc)."""
        _check_kv_dtype(kv_dtype)
        if min_rows < 1 or row_multiple < 1:
            raise ContractError(f"min_rows and row_multiple must be >= 1, got {min_rows} and {row_multiple}")
        if feature_layers and (hidden_size < 1 or any(not 0 <= k < num_layers for k in feature_layers)):
            raise ContractError(f"feature layers {feature_layers} must lie in [0, {num_layers}) with a hidden size")
        width = len(feature_layers) * hidden_size
        inputs = _token_inputs(static_shapes)
        outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", vocab_size)),
                   TensorSpec(NEXT_TOKENS, "int64", ("batch", "seq"))] + _top_outputs(top_k, vocab_size)
        if feature_layers:
            outputs.append(TensorSpec(FEATURES, "float32", ("batch", "seq", width)))
        inputs, outputs = _with_cache(inputs, outputs, num_layers, num_kv_heads, head_dim, kv_dtype)
        return cls(DECODER, num_layers, num_kv_heads, head_dim, vocab_size, kv_dtype, inputs, outputs,
                   tuple(feature_layers), width, hidden_size if feature_layers else 0, min_rows, row_multiple,
                   padded_attention)

    @classmethod
    def feature_draft(cls, num_kv_heads: int, head_dim: int, draft_vocab: int, hidden_size: int, feature_width: int,
                      kv_dtype: str, num_layers: int = 1, top_k: int = DRAFT_TOP_K,
                      static_shapes: bool = False) -> "GraphContract":
        """A trained feature draft's graph; ``kv_dtype`` and ``static_shapes`` follow its target's (features and
        hidden states cross as float32 whatever the cache's dtype)."""
        _check_kv_dtype(kv_dtype)
        inputs = _token_inputs(static_shapes) + [TensorSpec(FEATURES, "float32", ("batch", "feature_rows", feature_width)),
                                    TensorSpec(HIDDEN, "float32", ("batch", "hidden_rows", hidden_size))]
        outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", draft_vocab)),
                   TensorSpec(HIDDEN_STATES, "float32", ("batch", "seq", hidden_size))] + _top_outputs(top_k, draft_vocab)
        inputs, outputs = _with_cache(inputs, outputs, num_layers, num_kv_heads, head_dim, kv_dtype)
        return cls(FEATURE_DRAFT, num_layers, num_kv_heads, head_dim, draft_vocab, kv_dtype, inputs, outputs, (),
                   feature_width, hidden_size)

    @cached_property  # read on every pass; the contract is frozen
    def extra_inputs(self) -> tuple[TensorSpec, ...]:
        """Inputs besides tokens, positions, mask and cache (a feature draft's features and hidden)."""
        fixed = {INPUT_IDS, POSITION_IDS, TREE_MASK, PAST_LENGTH, *self.past_input_names}
        return tuple(s for s in self.inputs if s.name not in fixed)

    @cached_property  # read on every pass; the contract is frozen
    def extra_outputs(self) -> tuple[TensorSpec, ...]:
        """Per-token outputs besides logits and the cache (features, hidden_states): (batch, seq, width)."""
        fixed = {LOGITS, NEXT_TOKENS, TOP_TOKENS, TOP_PROBS, *self.present_output_names}
        return tuple(s for s in self.outputs if s.name not in fixed)

    @cached_property  # read on every pass; the contract is frozen
    def static_shapes(self) -> bool:
        """Whether the graph takes a capacity-wide mask and the committed length as ``past_length``."""
        return any(s.name == PAST_LENGTH for s in self.inputs)

    @property
    def spare_rows(self) -> int:
        """Rows a padded pass may write past the context (cache and rotary tables hold them besides)."""
        return max(self.min_rows, self.row_multiple) - 1 + int(self.padded_attention)

    @property
    def padded(self) -> bool:
        """Whether passes are padded (by the runtime or inside the graph) so that chains are bitwise exact."""
        return self.min_rows > 1 or self.row_multiple > 1 or self.padded_attention

    def padded_rows(self, seq: int) -> int:
        """The rows a pass of ``seq`` runs with: at least ``min_rows``, a multiple of ``row_multiple``."""
        return max(self.min_rows, -(-seq // self.row_multiple) * self.row_multiple)

    @cached_property  # read on every pass; the contract is frozen
    def top_k(self) -> int:
        """How many top tokens per row the graph computes (``top_tokens``), 0 if none."""
        return next((int(s.shape[-1]) for s in self.outputs if s.name == TOP_TOKENS), 0)

    @cached_property  # read on every pass; the contract is frozen
    def has_next_tokens(self) -> bool:
        """Whether the graph computes each row's argmax itself (``next_tokens``)."""
        return any(s.name == NEXT_TOKENS for s in self.outputs)

    def kv_commit(self) -> "GraphContract":
        """The contract of the helper graph that moves accepted rows of this decoder's cache into place."""
        kv_cache = ("batch", self.num_kv_heads, "capacity", self.head_dim)
        inputs = [TensorSpec(n, self.kv_dtype, kv_cache) for n in self.past_input_names]
        inputs += [TensorSpec(COMMIT_SRC, "int64", ("moved",)), TensorSpec(COMMIT_DST, "int64", ("batch",))]
        outputs = [TensorSpec(n, self.kv_dtype, kv_cache) for n in self.present_output_names]
        return GraphContract(KV_COMMIT, self.num_layers, self.num_kv_heads, self.head_dim, self.vocab_size,
                             self.kv_dtype, tuple(inputs), tuple(outputs))

    # -- names -------------------------------------------------------------------------------------------------
    @property
    def past_input_names(self) -> tuple[str, ...]:
        return tuple(n for layer in range(self.num_layers) for n in past_names(layer))

    @property
    def present_output_names(self) -> tuple[str, ...]:
        return tuple(n for layer in range(self.num_layers) for n in present_names(layer))

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "contract_version": CONTRACT_VERSION,
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "kv_dtype": self.kv_dtype,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "feature_layers": list(self.feature_layers),
            "feature_width": self.feature_width,
            "hidden_size": self.hidden_size,
            "min_rows": self.min_rows,
            "row_multiple": self.row_multiple,
            "padded_attention": self.padded_attention,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphContract":
        try:
            version = int(d["contract_version"])
            if version != CONTRACT_VERSION:
                raise ContractError(
                    f"graph contract version {version} is not supported (this specx reads version {CONTRACT_VERSION}); "
                    "re-export the bundle with this version of specx"
                )
            contract = cls(
                kind=str(d["kind"]),
                num_layers=int(d["num_layers"]),
                num_kv_heads=int(d["num_kv_heads"]),
                head_dim=int(d["head_dim"]),
                vocab_size=int(d["vocab_size"]),
                kv_dtype=str(d["kv_dtype"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                feature_layers=tuple(int(k) for k in d.get("feature_layers") or ()),
                feature_width=int(d.get("feature_width") or 0),
                hidden_size=int(d.get("hidden_size") or 0),
                min_rows=int(d.get("min_rows") or 1),
                row_multiple=int(d.get("row_multiple") or 1),
                padded_attention=bool(d.get("padded_attention", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"malformed graph contract ({exc!r}); re-export the bundle") from exc
        _check_kv_dtype(contract.kv_dtype)
        return contract

    # -- validation --------------------------------------------------------------------------------------------
    def check_session(self, inputs: Iterable[NodeArgLike], outputs: Iterable[NodeArgLike], graph: str) -> None:
        """Raise ContractError unless an ONNX Runtime session's inputs and outputs match this contract."""
        _check_args(self.inputs, list(inputs), f"{graph} inputs")
        _check_args(self.outputs, list(outputs), f"{graph} outputs")


def _top_outputs(top_k: int, vocab_size: int) -> list[TensorSpec]:
    k = min(top_k, vocab_size)
    if k < 1:
        return []
    return [TensorSpec(TOP_TOKENS, "int64", ("batch", "seq", k)), TensorSpec(TOP_PROBS, "float32", ("batch", "seq", k))]


def _token_inputs(static_shapes: bool = False) -> list[TensorSpec]:
    inputs = [
        TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
        TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
        TensorSpec(TREE_MASK, "bool", ("batch", 1, "seq", "capacity" if static_shapes else "total")),
    ]
    return inputs + [TensorSpec(PAST_LENGTH, "int64", ("batch",))] if static_shapes else inputs


def _with_cache(inputs: list[TensorSpec], outputs: list[TensorSpec], num_layers: int, num_kv_heads: int,
                head_dim: int, kv_dtype: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    kv_cache = ("batch", num_kv_heads, "capacity", head_dim)
    for layer in range(num_layers):
        inputs = inputs + [TensorSpec(n, kv_dtype, kv_cache) for n in past_names(layer)]
        outputs = outputs + [TensorSpec(n, kv_dtype, kv_cache) for n in present_names(layer)]
    return tuple(inputs), tuple(outputs)


_ORT_TYPES = {
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
}


def _check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ContractError(f"unsupported KV dtype {kv_dtype!r}; expected one of {', '.join(KV_DTYPES)}")


def _check_args(specs: Sequence[TensorSpec], args: Sequence[NodeArgLike], where: str) -> None:
    expected = {s.name: s for s in specs}
    found = {a.name: a for a in args}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ContractError(f"{where} do not match the contract: missing {missing}, unexpected {extra}; re-export the bundle")
    for name, spec in expected.items():
        arg = found[name]
        dtype = _ORT_TYPES.get(arg.type, arg.type)
        if dtype != spec.dtype:
            raise ContractError(f"{where}: {name} has type {dtype}, the contract says {spec.dtype}; re-export the bundle")
        shape = list(arg.shape)
        if len(shape) != len(spec.shape):
            raise ContractError(f"{where}: {name} has rank {len(shape)}, the contract says {len(spec.shape)}")
        for got, want in zip(shape, spec.shape):
            if isinstance(want, int) and isinstance(got, int) and got != want:
                raise ContractError(f"{where}: {name} has shape {shape}, the contract says {list(spec.shape)}")

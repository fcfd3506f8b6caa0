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
    past_key_values.{i}.key / .value
                   kv     (batch, kv_heads, capacity, head_dim)   the static cache: rows [0, past) are committed
    ->
    logits         float32 (batch, seq, vocab)
    present.{i}.key / .value
                   kv     (batch, kv_heads, capacity, head_dim)   the same buffer (bound as input and output):
                                                                  this pass's K/V written in place at [past, total)

KV-commit helper graph (moves accepted rows into place, on the device, in place)::

    past_key_values.{i}.key / .value  kv (batch, kv_heads, capacity, head_dim)   bound as input and output
    src                               int64 (moved,)    rows to keep, in order
    dst                               int64 (batch,)    first row they move to (rows dst .. dst + moved - 1)
    ->
    present.{i}.key / .value          kv (batch, kv_heads, capacity, head_dim)   = Gather(src) scattered at dst
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

from specx.errors import ContractError

CONTRACT_VERSION = 2
METADATA_KEY = "specx.contract"

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
TREE_MASK = "tree_mask"
LOGITS = "logits"
COMMIT_SRC = "src"
COMMIT_DST = "dst"

KV_DTYPES = ("float32", "float16")

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
    kind: str  # "decoder" | "kv_commit"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def decoder(cls, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int, kv_dtype: str) -> "GraphContract":
        _check_kv_dtype(kv_dtype)
        kv_cache = ("batch", num_kv_heads, "capacity", head_dim)
        inputs = [
            TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
            TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
            TensorSpec(TREE_MASK, "bool", ("batch", 1, "seq", "total")),
        ]
        outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", vocab_size))]
        for layer in range(num_layers):
            inputs += [TensorSpec(n, kv_dtype, kv_cache) for n in past_names(layer)]
            outputs += [TensorSpec(n, kv_dtype, kv_cache) for n in present_names(layer)]
        return cls("decoder", num_layers, num_kv_heads, head_dim, vocab_size, kv_dtype, tuple(inputs), tuple(outputs))

    def kv_commit(self) -> "GraphContract":
        """The contract of the helper graph that moves accepted rows of this decoder's cache into place."""
        kv_cache = ("batch", self.num_kv_heads, "capacity", self.head_dim)
        inputs = [TensorSpec(n, self.kv_dtype, kv_cache) for n in self.past_input_names]
        inputs += [TensorSpec(COMMIT_SRC, "int64", ("moved",)), TensorSpec(COMMIT_DST, "int64", ("batch",))]
        outputs = [TensorSpec(n, self.kv_dtype, kv_cache) for n in self.present_output_names]
        return GraphContract("kv_commit", self.num_layers, self.num_kv_heads, self.head_dim, self.vocab_size,
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


_ORT_TYPES = {
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
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

"""What the runtime reads from an ONNX file itself, without the onnx package: the graph's initializers (name, shape,
external-data file). A minimal reader of the protobuf wire format over ``ModelProto.graph.initializer``; every other
field is skipped by its length, so a graph file whose weights live in a ``.data`` file reads in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from specx.errors import BundleError

# field numbers of onnx.proto (ModelProto.graph, GraphProto.initializer, TensorProto.*, StringStringEntryProto.*)
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 1, 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    location: str | None  # external-data file, relative to the graph's directory; None when stored in the graph


def initializers(path: Path) -> dict[str, Initializer]:
    """The initializers of the ONNX graph at ``path``, by name."""
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"cannot read graph {path} ({exc}); re-export the bundle with `specx export`") from exc
    try:
        graphs = [value for field, value in _fields(data) if field == _MODEL_GRAPH]
        if not graphs:
            raise _Malformed("no graph")
        tensors = (_tensor(value) for field, value in _fields(graphs[-1]) if field == _GRAPH_INITIALIZER)
        return {t.name: t for t in tensors}
    except _Malformed as exc:
        raise BundleError(f"{path} is not a valid ONNX graph ({exc}); re-export the bundle with `specx export`") from exc


def _tensor(data: memoryview) -> Initializer:
    if not isinstance(data, memoryview):
        raise _Malformed("an initializer is not a message")
    name, dims, location = "", [], None
    for field, value in _fields(data):
        if field == _TENSOR_NAME:
            name = _text(value)
        elif field == _TENSOR_DIMS:
            dims += _int64s(value)
        elif field == _TENSOR_EXTERNAL_DATA:
            entry = {key: _text(v) for key, v in _fields(_message(value))}
            if entry.get(_ENTRY_KEY) == "location":
                location = entry.get(_ENTRY_VALUE, "")
    return Initializer(name, tuple(dims), location)


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of a message: an int for varints, the bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire in (_FIXED64, _FIXED32, _BYTES):
            size = 8 if wire == _FIXED64 else 4 if wire == _FIXED32 else None
            if size is None:
                size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise _Malformed("a field runs past the end of its message")
            value, pos = data[pos:pos + size], pos + size
        else:
            raise _Malformed(f"unknown wire type {wire}")
        yield field, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("a truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _int64s(value: int | memoryview) -> list[int]:
    """One dim (a varint) or a packed run of them; negative values in two's complement."""
    if isinstance(value, int):
        raw = [value]
    else:
        raw, pos = [], 0
        while pos < len(value):
            item, pos = _varint(value, pos)
            raw.append(item)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in raw]


def _message(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise _Malformed("a message field holds a number")
    return value


def _text(value: int | memoryview) -> str:
    try:
        return bytes(_message(value)).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed("a name is not UTF-8") from exc

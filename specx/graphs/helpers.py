"""Small helper graphs the runtime runs next to the decoders.

kv_gather: commits a subset of a pass's KV positions on the device::

    present.{i}.key  (batch, kv_heads, total, head_dim) --Gather(axis=2, keep)--> past_key_values.{i}.key
    present.{i}.value                                   --Gather(axis=2, keep)--> past_key_values.{i}.value
    keep             (kept,) int64: committed positions followed by the accepted new ones, in path order
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from specx.graphs.contract import GraphContract, TensorSpec
from specx.graphs.passes import embed_contract

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
               "bool": TensorProto.BOOL}
KV_AXIS = 2  # (batch, kv_heads, positions, head_dim)
IR_VERSION = 10  # readable by every onnxruntime >= 1.20; the onnx package may default to a newer one


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, _ONNX_TYPES[spec.dtype], list(spec.shape))


def build_kv_gather(decoder: GraphContract, opset: int) -> onnx.ModelProto:
    contract = decoder.kv_gather()
    keep = contract.inputs[-1].name
    kv_in = contract.inputs[:-1]
    nodes = [
        helper.make_node("Gather", [src.name, keep], [dst.name], axis=KV_AXIS, name=f"gather_{i}")
        for i, (src, dst) in enumerate(zip(kv_in, contract.outputs))
    ]
    graph = helper.make_graph(nodes, "specx_kv_gather", [_value_info(s) for s in contract.inputs],
                              [_value_info(s) for s in contract.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="specx")
    model.ir_version = IR_VERSION
    embed_contract(model, contract)
    onnx.checker.check_model(model)
    return model


def write_kv_gather(decoder: GraphContract, opset: int, path: Path) -> None:
    onnx.save(build_kv_gather(decoder, opset), str(path))

"""A small ONNX graph builder: named nodes, initializers from numpy, typed graph I/O, external-data saving.

Node names follow a rule (``/model/layers.{i}/attn/qkv_proj/MatMul``); a node's outputs are named after it
(``.../MatMul/output_0``), so a graph reads like onnxruntime-genai's and every tensor says where it comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from specx.graphs.contract import TensorSpec

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
              "int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL}
IR_VERSION = 10  # readable by every onnxruntime >= 1.20; the onnx package may default to a newer one
MS_DOMAIN = "com.microsoft"
EXTERNAL_THRESHOLD = 1024  # initializers of at least this many bytes go to the .data file


def numpy_float(name: str) -> np.dtype:
    """The numpy dtype of a graph float type; bfloat16 is ml_dtypes' (onnx's own dependency)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def lowest(name: str) -> np.ndarray:
    """The most negative finite value of a graph float type (an additive mask's 'blocked')."""
    if name == "bfloat16":
        import ml_dtypes

        return np.array(ml_dtypes.finfo(ml_dtypes.bfloat16).min, dtype=np.float32)
    return np.array(np.finfo(name).min)


def value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, ONNX_TYPES[spec.dtype], list(spec.shape))


class GraphBuilder:
    """Accumulates nodes and initializers; ``float_dtype`` is the dtype weights are stored in."""

    def __init__(self, name: str, float_dtype: str = "float32"):
        self.name = name
        self.float_dtype = numpy_float(float_dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._initializer_names: set[str] = set()

    # -- tensors ----------------------------------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        """A floating-point initializer, stored in the graph's float dtype."""
        return self.constant(name, np.asarray(array, dtype=self.float_dtype))

    def has(self, name: str) -> bool:
        return name in self._initializer_names

    def constant(self, name: str, array: np.ndarray) -> str:
        """An initializer stored as given (shapes, indices, caches)."""
        if name in self._initializer_names:
            raise ValueError(f"initializer {name} defined twice")
        self._initializer_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    # -- nodes ------------------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], name: str, outputs: int = 1, domain: str = "",
           **attrs: Any) -> list[str]:
        """Add one node named ``name``; return its output names. An empty input name is an omitted optional."""
        out = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out, name=name, domain=domain or None, **attrs))
        return out

    def op1(self, op_type: str, inputs: Sequence[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def rename_output(self, tensor: str, new_name: str) -> None:
        """Make a node output a graph output under the contract's name."""
        for node in self.nodes:
            for k, out in enumerate(node.output):
                if out == tensor:
                    node.output[k] = new_name
            for k, inp in enumerate(node.input):
                if inp == tensor:
                    node.input[k] = new_name

    # -- model ------------------------------------------------------------------------------------------------
    def model(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, [value_info(s) for s in inputs],
                                  [value_info(s) for s in outputs], self.initializers)
        opsets = [helper.make_opsetid("", opset)]
        if any(node.domain == MS_DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="specx")
        model.ir_version = IR_VERSION
        return model


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write ``path`` (graph) and ``path.data`` (weights), replacing both."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=EXTERNAL_THRESHOLD)

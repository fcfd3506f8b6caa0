"""Small passes over finished graphs: the embedded contract, and what a pass reads from memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from specx.graphs.contract import METADATA_KEY, GraphContract


def embed_contract(model: onnx.ModelProto, contract: GraphContract) -> None:
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    helper.set_model_props(model, {METADATA_KEY: json.dumps(contract.to_dict())})


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers one forward pass streams: all of them, except tables that are only looked up by
    Gather (token and position embeddings read a few rows per pass)."""
    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, set()).add("lookup" if node.op_type == "Gather" and k == 0 else "read")
    total = 0
    for init in model.graph.initializer:
        if consumers.get(init.name) == {"lookup"}:
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total

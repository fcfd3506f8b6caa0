"""Graph passes applied to every exported decoder.

    torch.onnx output             finalize()
    ----------------------        -----------------------------------------------
    inputs  (s10, s42), ...   ->  inputs  (batch, seq), ... named as the contract
    no specx metadata         ->  metadata_props["specx.contract"] = contract JSON
    weights in one .data file     (untouched: the pass edits the graph proto only)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from specx.graphs.contract import METADATA_KEY, GraphContract, TensorSpec


def name_dims(values: list[onnx.ValueInfoProto], specs: tuple[TensorSpec, ...]) -> None:
    """Give the graph's inputs or outputs the contract's symbolic dimension names."""
    by_name = {s.name: s for s in specs}
    for value in values:
        spec = by_name[value.name]
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want


def embed_contract(model: onnx.ModelProto, contract: GraphContract) -> None:
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    helper.set_model_props(model, {METADATA_KEY: json.dumps(contract.to_dict())})


def finalize(path: Path, contract: GraphContract) -> None:
    """Name dimensions and embed the contract, editing the model proto without loading external weights."""
    model = onnx.load(str(path), load_external_data=False)
    name_dims(list(model.graph.input), contract.inputs)
    name_dims(list(model.graph.output), contract.outputs)
    embed_contract(model, contract)
    onnx.save(model, str(path))  # the proto only: initializers keep pointing at the external data file


def embed_contract_in_file(path: Path, contract: GraphContract) -> None:
    model = onnx.load(str(path), load_external_data=False)
    embed_contract(model, contract)
    onnx.save(model, str(path))


def weight_bytes(path: Path) -> int:
    """Bytes of all initializers: what one forward pass reads from memory at least once."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total

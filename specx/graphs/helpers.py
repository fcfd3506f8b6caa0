"""Small helper graphs the runtime runs next to the decoders.

kv_commit: moves the accepted rows of a static cache into place, on the device, in place::

    past_key_values.{i}.key (batch, kv_heads, capacity, head_dim) --Gather(axis=2, src)--> rows (.., moved, ..)
        --TensorScatter(axis=2, write_indices=dst)--> present.{i}.key   (the same buffer: bound as input and output)

After P committed tokens a tree pass writes its n nodes at rows [P, P+n); the accepted path i_0 < i_1 < ... moves
to rows P, P+1, ...: src = P + i_j, dst = P. Gather copies the few moved rows first, so no row is overwritten
before it is read; nothing else in the cache moves.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from specx.graphs.builder import IR_VERSION, value_info
from specx.graphs.contract import COMMIT_DST, COMMIT_SRC, GraphContract
from specx.graphs.passes import embed_contract

KV_AXIS = 2  # (batch, kv_heads, positions, head_dim)
COMMIT_OPSET = 24  # TensorScatter


def build_kv_commit(decoder: GraphContract) -> onnx.ModelProto:
    contract = decoder.kv_commit()
    nodes = []
    for i, (cache, out) in enumerate(zip(decoder.past_input_names, decoder.present_output_names)):
        rows = f"/commit/{i}/Gather/output_0"
        nodes.append(helper.make_node("Gather", [cache, COMMIT_SRC], [rows], axis=KV_AXIS, name=f"/commit/{i}/Gather"))
        nodes.append(helper.make_node("TensorScatter", [cache, rows, COMMIT_DST], [out], axis=KV_AXIS,
                                      name=f"/commit/{i}/TensorScatter"))
    graph = helper.make_graph(nodes, "specx_kv_commit", [value_info(s) for s in contract.inputs],
                              [value_info(s) for s in contract.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", COMMIT_OPSET)], producer_name="specx")
    model.ir_version = IR_VERSION
    embed_contract(model, contract)
    onnx.checker.check_model(model)
    return model


def write_kv_commit(decoder: GraphContract, path: Path) -> None:
    onnx.save(build_kv_commit(decoder), str(path))

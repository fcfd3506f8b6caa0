"""Export one decoder: the fused tree-attention graph built from the model's weights, and its KV-commit helper.

    HF model --adapter.weights()--> DecoderWeights --build_decoder()--> <stem>.onnx + <stem>.onnx.data
                                                   build_kv_commit() -> <stem>.kv_commit.onnx

docs/design.md says why the graph is built from the weights rather than traced.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specx.exporter.adapters import ArchitectureAdapter
from specx.graphs.builder import save_with_external_data
from specx.graphs.contract import GraphContract
from specx.graphs.decoder import HeadKind, build_decoder
from specx.graphs.helpers import write_kv_commit
from specx.graphs.passes import embed_contract

DEFAULT_OPSET = 18


def contract_for(adapter: ArchitectureAdapter, kv_dtype: str, feature_layers: tuple[int, ...] = (),
                 top_k: int = 0, static_shapes: bool = False, min_rows: int = 1,
                 row_multiple: int = 1, padded_attention: bool = False) -> GraphContract:
    """``top_k``: a draft's graph computes its top tokens per row (``DRAFT_TOP_K``); a target's does not.
    ``static_shapes``: a capacity-wide mask and the committed length as an input (CUDA graphs). ``min_rows``,
    ``row_multiple``: the rows the runtime pads passes to, ``padded_attention``: the graph's dummy attention row
    (quantized CPU targets: exact chains)."""
    spec = adapter.spec
    return GraphContract.decoder(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size, kv_dtype,
                                 feature_layers, spec.hidden_size, top_k, static_shapes, min_rows,
                                 row_multiple, padded_attention)


def export_decoder(adapter: ArchitectureAdapter, model: torch.nn.Module, path: Path, kv_dtype: str,
                   opset: int = DEFAULT_OPSET, head: HeadKind = "shared",
                   feature_layers: tuple[int, ...] = (), top_k: int = 0, static_shapes: bool = False,
                   min_rows: int = 1, row_multiple: int = 1, padded_attention: bool = False) -> GraphContract:
    """Write ``model``'s graph to ``path`` (+ ``path.data``) and its KV-commit helper beside it; return the contract.

    ``head="own"`` gives a tied model its own lm_head copy (for weight quantization); ``feature_layers`` adds the
    features output a trained feature draft reads; ``top_k`` a draft's top tokens per row."""
    contract = contract_for(adapter, kv_dtype, feature_layers, top_k, static_shapes, min_rows, row_multiple,
                            padded_attention)
    graph = build_decoder(adapter.spec, adapter.family, adapter.weights(model), contract, opset, head)
    embed_contract(graph, contract)
    save_with_external_data(graph, path)
    write_kv_commit(contract, commit_path(path))
    return contract


def commit_path(graph_path: Path) -> Path:
    return graph_path.with_name(graph_path.stem + ".kv_commit.onnx")

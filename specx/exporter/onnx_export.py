"""torch.onnx (dynamo) export of one decoder to a tree-mask graph with KV inputs and outputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from specx.exporter.adapters import ArchitectureAdapter
from specx.exporter.wrapper import TreeDecoder
from specx.graphs import passes
from specx.graphs.contract import GraphContract
from specx.graphs.helpers import write_kv_gather

# Sample sizes for tracing. Every dimension is exported dynamic; sizes of 0 or 1 would be specialised by
# torch.export, so the samples avoid them.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 3, 4
DEFAULT_OPSET = 18


def contract_for(adapter: ArchitectureAdapter, kv_dtype: str) -> GraphContract:
    spec = adapter.spec
    return GraphContract.decoder(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size, kv_dtype)


def sample_inputs(contract: GraphContract, dtype: torch.dtype, batch: int, seq: int, past: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs of the contract's shapes: causal mask over new tokens, full view of the past."""
    input_ids = torch.randint(0, contract.vocab_size, (batch, seq), generator=generator)
    position_ids = torch.arange(past, past + seq).expand(batch, seq)
    tree_mask = torch.ones(batch, 1, seq, past + seq, dtype=torch.bool)
    tree_mask[..., past:] = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    kv_shape = (batch, contract.num_kv_heads, past, contract.head_dim)
    kv = [torch.randn(kv_shape, generator=generator).to(dtype) for _ in contract.past_input_names]
    return (input_ids, position_ids, tree_mask, *kv)


def export_decoder(adapter: ArchitectureAdapter, model: torch.nn.Module, path: Path, kv_dtype: str,
                   opset: int = DEFAULT_OPSET) -> GraphContract:
    """Export ``model`` to ``path`` (+ ``path.data``) and its KV-gather helper beside it; return the contract."""
    contract = contract_for(adapter, kv_dtype)
    wrapper = TreeDecoder(model, adapter).eval()
    args = sample_inputs(contract, model.dtype, SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST)
    dyn = torch.export.Dim.DYNAMIC
    ids_shape = {0: dyn, 1: dyn}
    mask_shape = {0: dyn, 2: dyn, 3: dyn}
    kv_shapes = tuple({0: dyn, 2: dyn} for _ in contract.past_input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _quiet_torch_onnx()
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=[t.name for t in contract.inputs],
            output_names=[t.name for t in contract.outputs],
            dynamic_shapes=(ids_shape, ids_shape, mask_shape, kv_shapes),
            opset_version=opset,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    passes.finalize(path, contract)
    write_kv_gather(contract, opset, gather_path(path))
    return contract


def gather_path(graph_path: Path) -> Path:
    return graph_path.with_name(graph_path.stem + ".kv_gather.onnx")


def _quiet_torch_onnx() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)

"""Weight-only quantization of a decoder graph: int8 / int4 targets (``--dtype int8|int4``) and derived drafts
(``self:int8``, ``self:int4``) go through the same function.

    MatMul(x, W) fp32 (every projection and the lm_head)   MatMulNBitsQuantizer   MatMulNBits(x, Wq, scales)

The graph to quantize must carry its own lm_head matrix (``build_decoder(head="own")``), so the head is quantized
too. accuracy_level 4 (int8 activations in the kernel) keeps multi-token passes fast on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Any

import onnx

from specx.graphs.builder import save_with_external_data
from specx.graphs.contract import GraphContract
from specx.graphs.passes import embed_contract

BLOCK_SIZE = 32  # the default; 128 measured a 16% faster int4 step on SmolLM2-135M (docs/benchmarks.md)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVEL = 4  # int8 compute: fast; amplifies float differences ~1e-7 to ~1 logit, so only exact chains
EXACT_ACCURACY_LEVEL = 0  # float compute: tree passes give what one-token steps give (~1.3x slower steps measured)
INT8_COMPUTE_LEVEL = 4  # MatMulNBits quantizes activations to int8 at this level (x86 CPU: 1-3 compute in float)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
SUPPORTED_BITS = (4, 8)


def scheme(bits: int, activations: str = "float32", accuracy_level: int = ACCURACY_LEVEL,
           block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """What the manifest records about a quantized graph (``activations``: the float type MatMulNBits takes)."""
    return {"method": "MatMulNBits", "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
            "symmetric": True, "lm_head": True, "activations": activations}


def quantize_decoder(src: Path, dst: Path, bits: int, contract: GraphContract,
                     accuracy_level: int = ACCURACY_LEVEL, block_size: int = BLOCK_SIZE) -> None:
    """Write a weight-only quantized copy of the decoder at ``src`` to ``dst`` (+ ``dst.data``)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    MatMulNBitsQuantizer = _import_quantizer()
    model = onnx.load(str(src))  # with external weights
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantized = quantizer.model.model
    embed_contract(quantized, contract)
    save_with_external_data(quantized, dst)


def unquantized_path(path: Path) -> Path:
    """Where a graph that will be quantized into ``path`` is built (and checked) first."""
    return path.with_name(f"{path.stem}.unquantized.onnx")


def quantize_built(path: Path, bits: int, contract: GraphContract, accuracy_level: int = ACCURACY_LEVEL,
                   block_size: int = BLOCK_SIZE) -> None:
    """Quantize the graph built at ``unquantized_path(path)`` into ``path``, then remove the unquantized files."""
    built = unquantized_path(path)
    quantize_decoder(built, path, bits, contract, accuracy_level, block_size)
    for leftover in path.parent.glob(f"{built.stem}*"):
        leftover.unlink()


def _import_quantizer():  # noqa: ANN202
    """Import onnxruntime's quantizer without letting its logging.basicConfig(INFO) flood the user's terminal."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in root.handlers[len(handlers):]:
        root.removeHandler(handler)
    root.setLevel(level)
    return MatMulNBitsQuantizer

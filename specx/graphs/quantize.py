"""Weight-only quantization of a decoder graph (for drafts derived from the target: ``self:int8``, ``self:int4``).

    MatMul(x, Transpose(W))       fold_constant_transposes       MatMul(x, W_T)          (lm_head of tied models)
    MatMul(x, W_T) fp32           MatMulNBitsQuantizer           MatMulNBits(x, Wq, scales)   int8 / int4 blocks

accuracy_level 4 (int8 activations in the kernel) keeps multi-token passes fast on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
SUPPORTED_BITS = (4, 8)


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) by a transposed initializer; return how many were folded."""
    inits = {init.name: init for init in model.graph.initializer}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[node.input[0]])
        transposed = np.ascontiguousarray(np.transpose(weight, perm))
        model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    return folded


def quantize_decoder(src: Path, dst: Path, bits: int) -> None:
    """Write a weight-only quantized copy of the decoder at ``src`` to ``dst`` (+ ``dst.data``)."""
    MatMulNBitsQuantizer = _import_quantizer()
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    model = onnx.load(str(src))  # with external weights
    fold_constant_transposes(model)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data")


def _import_quantizer():  # noqa: ANN202
    """Import onnxruntime's quantizer without letting its logging.basicConfig(INFO) flood the user's terminal."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in root.handlers[len(handlers):]:
        root.removeHandler(handler)
    root.setLevel(level)
    return MatMulNBitsQuantizer

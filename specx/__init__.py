"""specx: staged speculative decoding on ONNX Runtime.

The import package is split so that apps can embed the runtime without PyTorch:
``specx.runtime`` (numpy + onnxruntime + tokenizers), ``specx.graphs`` (the graph contract and ONNX passes) and
``specx.exporter`` (torch + transformers, installed with the ``export`` extra).
"""

__version__ = "0.1.0"

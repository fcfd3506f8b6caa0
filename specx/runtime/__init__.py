"""The torch-free runtime: numpy + onnxruntime + tokenizers only.

Importing this package must never import torch or transformers (a test enforces it).
"""

from specx.runtime.bundle import Bundle
from specx.runtime.config import GenerationConfig, TreeConfig
from specx.runtime.generator import GenerationResult, GenerationStats, Generator, TextStream
from specx.runtime.sampling import SamplingConfig

__all__ = ["Bundle", "GenerationConfig", "GenerationResult", "GenerationStats", "Generator", "SamplingConfig",
           "TextStream", "TreeConfig"]

"""Which precision the torch side computes in: bfloat16 where the device runs it faster, float32 elsewhere.

A copy of the target in this precision writes the training text and records the labels (features and distributions:
in bfloat16, the float32 argmax at 98% of positions and features within 1%, 2.5x faster); the draft's matrix
products run under autocast (its master weights stay float32). The exported target stays float32. On CPUs,
bfloat16 is fast only where the hardware has it (AMX, AVX512-BF16) and far slower where it is emulated, so it is
measured on the spot, not assumed.
"""

from __future__ import annotations

import copy
import time

import torch

PROBE_SHAPE = (128, 576, 1536)  # rows x inner x outer: one small decoder's MLP over a batch of tokens
PROBE_REPEATS = 5
MIN_GAIN = 1.2  # bfloat16 must be this much faster to be used


def in_precision(model: torch.nn.Module, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """``model`` (float32, on the CPU) in ``dtype`` on ``device``: the model itself where nothing changes, else a copy
    (the source stays float32 for export)."""
    if dtype == torch.float32 and device == "cpu":
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def fast_dtype(device: str) -> torch.dtype:
    """torch.bfloat16 where ``device`` (cpu, cuda or cuda:N) runs it clearly faster than float32, else
    torch.float32."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    fp32 = _matmul_seconds(torch.float32)
    try:
        bf16 = _matmul_seconds(torch.bfloat16)
    except RuntimeError:  # a build without bfloat16 kernels
        return torch.float32
    return torch.bfloat16 if fp32 >= MIN_GAIN * bf16 else torch.float32


def _matmul_seconds(dtype: torch.dtype) -> float:
    rows, inner, outer = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator).to(dtype)
    b = torch.randn(inner, outer, generator=generator).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best

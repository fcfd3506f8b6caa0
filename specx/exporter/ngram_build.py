"""Building the bundle's n-gram table (draft2): text the target writes itself, the recipe `specx train-draft` writes
its training text with (requests on built-in topics answered through the chat template, the same requests continued
as plain text, free and random-prompt samples; half greedy, half sampled at 0.8), and/or text files the user passes.

The table proposes what the target itself tends to write next, so it is fitted on the target's own text: replayed on
SmolLM2's int4 greedy outputs for 16 held-out prompts, n-gram 1-chains reached tau 1.43 with a table from 250,000
tokens of this text (1.38-1.40 from 12,500-100,000), 1.29 counting the context alone, and 1.28 with a table from
30,000 tokens sampled at temperature 1.5 (what this module did before, after the paper): docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specx.drafttrain.data import ProgressBar, generate_texts
from specx.drafttrain.precision import fast_dtype, in_precision
from specx.runtime.ngram import DEFAULT_SAMPLE_TOKENS, KatzTrigram

TEXT_RECIPE = "self-written (train-draft's text recipe)"
__all__ = ["DEFAULT_SAMPLE_TOKENS", "build_ngram"]


class _Counter(ProgressBar):
    def __init__(self, on_tokens: Callable[[int], None]):
        self.on_tokens = on_tokens

    def update(self, n: int = 1) -> None:
        self.on_tokens(n)


def self_written(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: int, seed: int = 0,
                 on_tokens: Callable[[int], None] = lambda n: None) -> list[list[int]]:
    """About ``tokens`` tokens (at least that many) the target writes itself, in the precision this CPU runs
    fastest (bfloat16 where it measures faster, else the model itself); ``on_tokens(n)`` after each batch."""
    texts = generate_texts(in_precision(model, fast_dtype("cpu")), tokenizer, tokens, np.random.default_rng(seed),
                           progress=lambda _name, _total: _Counter(on_tokens))
    return [text.tolist() for text in texts]


def corpus_sequences(files: Sequence[Path], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    sequences = []
    for path in files:  # existence is checked before the export starts (pipeline.export_bundle)
        text = path.read_text(encoding="utf-8", errors="replace")
        sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sequences


def build_ngram(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vocab_size: int, sample_tokens: int,
                corpus: Sequence[Path], on_tokens: Callable[[int], None] = lambda n: None) -> tuple[KatzTrigram, dict]:
    """The table from ``sample_tokens`` tokens of the target's own text plus the ``corpus`` files."""
    sequences = corpus_sequences(corpus, tokenizer)
    written = self_written(model, tokenizer, sample_tokens, on_tokens=on_tokens) if sample_tokens > 0 else []
    info = {"sampled_tokens": sum(len(s) for s in written), "text": TEXT_RECIPE if written else None,
            "corpus_files": [str(p) for p in corpus], "total_tokens": sum(len(s) for s in sequences + written)}
    return KatzTrigram.fit(sequences + written, vocab_size), info

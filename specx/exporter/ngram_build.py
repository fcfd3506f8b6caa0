"""Building the bundle's n-gram table (draft2): text sampled from the draft model, as the paper did (it sampled at
temperature 1.5), and/or text files the user passes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specx.runtime.ngram import DEFAULT_SAMPLE_TOKENS, KatzTrigram

SAMPLE_TEMPERATURE = 1.5
SAMPLE_BATCH = 16
SAMPLE_LENGTH = 256  # tokens per sampled sequence
__all__ = ["DEFAULT_SAMPLE_TOKENS", "build_ngram"]


def sample_sequences(model: PreTrainedModel, start_token: int, tokens: int, max_positions: int,
                     seed: int = 0, on_tokens: Callable[[int], None] = lambda n: None) -> list[list[int]]:
    """``tokens`` tokens sampled from ``model`` in batches, each sequence starting from ``start_token``;
    ``on_tokens(n)`` after each batch (a progress bar)."""
    torch.manual_seed(seed)
    out: list[list[int]] = []
    remaining = tokens
    while remaining > 0:
        length = min(SAMPLE_LENGTH, max_positions - 1, remaining)
        batch = min(SAMPLE_BATCH, -(-remaining // length))
        start = torch.full((batch, 1), start_token, dtype=torch.long)
        with torch.no_grad():
            generated = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                       temperature=SAMPLE_TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=length,
                                       min_new_tokens=length, pad_token_id=start_token)
        out.extend(row.tolist() for row in generated)
        remaining -= batch * length
        on_tokens(batch * length)
    return out


def corpus_sequences(files: Sequence[Path], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    sequences = []
    for path in files:  # existence is checked before the export starts (pipeline.export_bundle)
        text = path.read_text(encoding="utf-8", errors="replace")
        sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sequences


def build_ngram(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_positions: int,
                sample_tokens: int, corpus: Sequence[Path],
                on_tokens: Callable[[int], None] = lambda n: None) -> tuple[KatzTrigram, dict]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequences = corpus_sequences(corpus, tokenizer)
    if sample_tokens > 0:
        sequences += sample_sequences(model, int(start or 0), sample_tokens, max_positions, on_tokens=on_tokens)
    total = sum(len(s) for s in sequences)
    info = {"sampled_tokens": sample_tokens, "sample_temperature": SAMPLE_TEMPERATURE,
            "corpus_files": [str(p) for p in corpus], "total_tokens": total}
    return KatzTrigram.fit(sequences, vocab_size), info

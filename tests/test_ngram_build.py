"""The export's n-gram table: fitted on text the target writes itself, so it proposes what the target writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specx.exporter.ngram_build import TEXT_RECIPE, build_ngram
from specx.exporter.sources import load_source
from specx.runtime.ngram import KatzTrigram, SessionNgram
from tests import tiny_models

TEXT_TOKENS = 3000
NEW_TOKENS = 48
PROMPTS = ("hello world", "the cat sat", "one two")


@pytest.fixture(scope="module")
def predictable(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201  (a LoadedModel)
    return load_source(str(tiny_models.save_trained_llama(tmp_path_factory.mktemp("hf") / "tiny-llama-trained")),
                       "fp32")


def _hit_rate(table: KatzTrigram, tokens: list[int]) -> float:
    """How often the table alone (no session counts) proposes the next token of ``tokens``."""
    ngram = SessionNgram(table, online=False)
    return float(np.mean([ngram.next_token(tokens[i - 2], tokens[i - 1]) == tokens[i] for i in range(2, len(tokens))]))


def _greedy(loaded, prompt: str) -> list[int]:  # noqa: ANN001
    ids = torch.tensor([loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    return loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)[0].tolist()


def test_the_table_proposes_what_the_target_writes(predictable):
    vocab = predictable.model.config.vocab_size
    table, info = build_ngram(predictable.model, predictable.tokenizer, vocab, TEXT_TOKENS, [])
    assert info["sampled_tokens"] >= TEXT_TOKENS and info["text"] == TEXT_RECIPE
    assert info["total_tokens"] == info["sampled_tokens"]
    noise = KatzTrigram.fit([np.random.default_rng(0).integers(0, vocab, TEXT_TOKENS).tolist()], vocab)
    own = [_hit_rate(table, _greedy(predictable, p)) for p in PROMPTS]
    other = [_hit_rate(noise, _greedy(predictable, p)) for p in PROMPTS]
    # measured: 0.30-0.51 per prompt against 0.0 for a table of as many random tokens
    assert np.mean(own) >= 0.25 and np.mean(own) > np.mean(other) + 0.2, (own, other)


def test_corpus_files_only_write_no_text(predictable, tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    table, info = build_ngram(predictable.model, predictable.tokenizer, predictable.model.config.vocab_size, 0,
                              [corpus])
    assert info["sampled_tokens"] == 0 and info["text"] is None and info["total_tokens"] > 0
    assert info["corpus_files"] == [str(corpus)]

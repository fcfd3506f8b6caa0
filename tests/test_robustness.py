"""Inputs and uses that used to break the runtime: shared Generators, trees at the end of the context, templates and
arguments that never end or crash, and CLI values that were silently misread."""

from __future__ import annotations

import pytest

from specx.runtime import Generator

TREES = [(8, 4), (12, 3), (30, 2)]  # wider than a chain: more nodes than the last steps have positions for


@pytest.fixture(scope="module")
def self_gen(llama_self_bundle) -> Generator:
    return Generator.load(llama_self_bundle, provider="cpu")


def _to_the_end(gen: Generator, prompt: str = "one two three") -> tuple[list[int], int, list[int]]:
    """Prompt ids, the new tokens that fill the context, and plain decoding's tokens for them."""
    ids = gen.bundle.tokenizer.encode(prompt).ids
    new = gen.max_positions - len(ids)
    plain = gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="autoregressive").tokens
    assert len(plain) == new
    return ids, new, plain


# -- trees at the end of the context -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
@pytest.mark.parametrize("budget,depth", TREES)
def test_a_wide_tree_reaches_the_end_of_the_context(self_gen, mode, budget, depth):
    """Near the end the tree shrinks to the positions left (it crashed in GroupQueryAttention: cos_cache dimension 0
    shall not be less than total_sequence_length)."""
    ids, new, plain = _to_the_end(self_gen)
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode=mode, tree_budget=budget, tree_depth=depth)
    assert out.tokens == plain


@pytest.mark.parametrize("kwargs", [{"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 3,
                                                                         "draft_choice": "top"}, {"tree_floor": 0.05}])
def test_drawn_and_floored_trees_reach_the_end_of_the_context(self_gen, kwargs):
    ids, new, plain = _to_the_end(self_gen)
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="speculative", tree_budget=12,
                            tree_depth=3, **kwargs)
    assert len(out.tokens) == new
    if "temperature" not in kwargs:
        assert out.tokens == plain


def test_a_tuned_tree_reaches_the_end_of_the_context(self_gen, monkeypatch):
    ids, new, plain = _to_the_end(self_gen)
    monkeypatch.setattr(self_gen, "tuned", lambda sampling: {"mode": "staged", "tree_budget": 12, "tree_depth": 6,
                                                             "tree_threshold": 0.0})
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True)
    assert out.tokens == plain and out.stats.tree_budget == 12


def test_a_capped_context_bounds_trees_and_caches(llama_self_bundle):
    gen = Generator.load(llama_self_bundle, provider="cpu", max_context=40)
    ids, new, plain = _to_the_end(gen)
    out = gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="staged", tree_budget=30, tree_depth=3)
    assert out.tokens == plain
    assert gen.target.capacity <= 64 and gen.draft.capacity <= 64  # one cache block: the cap bounds memory

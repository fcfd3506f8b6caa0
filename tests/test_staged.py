"""Staged decoding (draft + n-gram draft2) and n-gram-only decoding stay lossless; online counts save draft calls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from specx.runtime import Generator
from specx.runtime.decoding import DecodeRequest, ModelDrafter, StepLog, speculative
from specx.runtime.drafting import TokenDraft, TreeShape
from specx.runtime.ngram import SessionNgram
from specx.runtime.sampling import SamplingConfig
from tests.helpers import CACHE_ROWS, assert_first_two_tokens_follow_the_model
from tests.test_speculative import SAMPLING_CASES

PROMPTS = ["def f12(x):", "one two three one two three one two", "the quick brown fox"]
SHAPES = [(4, 4), (8, 4), (6, 6), (12, 3)]
BUNDLES = ["gpt2_bundle", "llama_self_bundle"]


@pytest.fixture(scope="module")
def generators(request):
    return {name: Generator.load(request.getfixturevalue(name), provider="cpu") for name in BUNDLES}


@pytest.mark.parametrize("bundle,prompt,shape", list(itertools.product(BUNDLES, PROMPTS, SHAPES)))
def test_staged_greedy_equals_autoregressive(generators, bundle, prompt, shape):
    gen = generators[bundle]
    ar = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="autoregressive")
    st = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="staged", tree_budget=shape[0],
                      tree_depth=shape[1])
    assert st.tokens == ar.tokens
    assert st.stats.mode == "staged" and st.stats.draft2_proposed > 0


@pytest.mark.parametrize("bundle,prompt", list(itertools.product(BUNDLES, PROMPTS)))
def test_ngram_mode_greedy_equals_autoregressive(generators, bundle, prompt):
    gen = generators[bundle]
    ar = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="autoregressive")
    ng = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="ngram", tree_depth=5)
    assert ng.tokens == ar.tokens
    assert ng.stats.draft_calls == 0 and ng.stats.draft2_proposed > 0


def test_default_mode_is_staged_with_draft_and_table(generators):
    assert generators["gpt2_bundle"].generate("one", max_new_tokens=3).stats.mode == "staged"


@pytest.mark.parametrize("kwargs", SAMPLING_CASES)
def test_staged_sampling_matches_the_model_distribution(generators, kwargs):
    assert_first_two_tokens_follow_the_model(generators["gpt2_bundle"], "staged", 20_000, **kwargs)


def _staged_draft_calls(gen: Generator, prompt: list[int], online: bool) -> tuple[list[int], StepLog, int]:
    log = StepLog()
    drafter = ModelDrafter(TokenDraft(gen.draft), SessionNgram(gen.ngram, online=online), log)
    request = DecodeRequest(tuple(prompt), 48, SamplingConfig(), frozenset(), gen.max_positions)
    for session in (gen.target, gen.draft):
        session.reset()
        session.reset_counters()
        session.reserve(CACHE_ROWS)
    tokens = list(speculative(gen.target, drafter, request, TreeShape(8, 8), np.random.default_rng(0), log))
    return tokens, log, gen.draft.calls


def test_online_counts_make_a_repeated_span_cheaper(repeater_bundle):
    gen = Generator.load(repeater_bundle, provider="cpu")
    greedy = gen.generate("one two", max_new_tokens=24, ignore_eos=True, mode="autoregressive").tokens
    assert len(set(greedy[-8:])) <= 2  # the crafted model repeats itself: its own output is a repetitive span
    prompt = gen.bundle.tokenizer.encode("one two").ids + greedy
    online_tokens, online_log, online_calls = _staged_draft_calls(gen, prompt, online=True)
    static_tokens, static_log, static_calls = _staged_draft_calls(gen, prompt, online=False)
    assert online_tokens == static_tokens == gen.generate(prompt, max_new_tokens=48, ignore_eos=True,
                                                          mode="autoregressive").tokens
    assert online_log.stage_two.accepted > static_log.stage_two.accepted
    assert online_calls < static_calls


def test_staged_statistics(generators):
    s = generators["llama_self_bundle"].generate("one two three one two three", max_new_tokens=40, ignore_eos=True,
                                                 mode="staged", tree_budget=6, tree_depth=6).stats
    assert s.draft2_proposed >= s.draft2_accepted >= 0
    assert s.draft_calls_saved >= 0 and s.draft2_seconds > 0
    assert s.overhead_fraction >= 0


def test_staged_without_a_table_counts_the_context_and_stays_exact(llama_self_bundle):
    gen = Generator.load(llama_self_bundle, provider="cpu")
    gen.ngram = None  # as a bundle exported with --ngram-tokens 0
    for prompt in ("one two three one two three", "def f1(x):"):
        plain = gen.generate(prompt, max_new_tokens=30, ignore_eos=True, mode="autoregressive").tokens
        result = gen.generate(prompt, max_new_tokens=30, ignore_eos=True, mode="staged", tree_budget=6, tree_depth=6)
        assert result.tokens == plain and result.stats.mode == "staged"

"""Greedy decoding brings back each row's argmax only (``next_tokens``, computed in the graph), never the logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specx.exporter.validate import random_tree
from specx.graphs.contract import NEXT_TOKENS
from specx.runtime import Generator
from specx.runtime.decoding import feed
from specx.runtime.session import DecoderSession
from tests.helpers import open_target


@pytest.mark.parametrize("bundle_fixture", ["llama_bundle", "gpt2_bundle", "llama_hd8_bundle"])
def test_graph_argmax_equals_numpy_argmax(bundle_fixture, request):
    session = open_target(request.getfixturevalue(bundle_fixture))
    assert session.contract.has_next_tokens
    rng = np.random.default_rng(0)
    for trial in range(3):
        session.reset()
        past = 5 + trial
        feed(session, rng.integers(0, session.contract.vocab_size, past).astype(np.int64))
        tree = random_tree(12, rng)
        tokens = rng.integers(0, session.contract.vocab_size, (1, tree.size)).astype(np.int64)
        args = (tokens, tree.positions(past), tree.attention_mask(past))
        logits = session.forward(*args)
        ids = session.forward_tokens(*args)
        assert ids.dtype == np.int64 and ids.shape == (1, tree.size)
        np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("mode", ["autoregressive", "speculative", "staged"])
def test_greedy_decoding_never_brings_back_logits(llama_self_bundle, mode, monkeypatch):
    gen = Generator.load(llama_self_bundle, provider="cpu")
    expected = gen.generate("one two", max_new_tokens=24, mode=mode, ignore_eos=True).tokens
    target = gen.target
    forward = DecoderSession.forward

    def no_target_logits(self, *args, **kwargs):  # the draft still reads its logits (it needs probabilities)
        if self is target:
            raise AssertionError("greedy decoding fetched the target's logits")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DecoderSession, "forward", no_target_logits)
    assert gen.generate("one two", max_new_tokens=24, mode=mode, ignore_eos=True).tokens == expected


def test_a_graph_without_next_tokens_falls_back_to_the_logits(llama_bundle, monkeypatch):
    """Bundles exported before ``next_tokens`` existed decode greedily as before."""
    session = open_target(llama_bundle)
    legacy = dataclasses.replace(session.contract, outputs=tuple(
        s for s in session.contract.outputs if s.name != NEXT_TOKENS))
    monkeypatch.setattr(session, "contract", legacy)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, legacy.vocab_size, (1, 4)).astype(np.int64)
    tree = random_tree(4, rng)
    session.reset()
    args = (ids, tree.positions(0), tree.attention_mask(0))
    np.testing.assert_array_equal(session.forward_tokens(*args), np.argmax(session.forward(*args), axis=-1))


def test_draft_top_tokens_equal_numpy_top_tokens(llama_self_bundle):
    """A draft graph's top_tokens / top_probs == softmax + sort of its logits (most likely first)."""
    from tests.helpers import open_draft

    session = open_draft(llama_self_bundle)
    k = session.contract.top_k
    assert k == 8
    rng = np.random.default_rng(2)
    feed(session, rng.integers(0, session.contract.vocab_size, 6).astype(np.int64))
    tree = random_tree(7, rng)
    tokens = rng.integers(0, session.contract.vocab_size, (1, tree.size)).astype(np.int64)
    args = (tokens, tree.positions(6), tree.attention_mask(6))
    logits = session.forward(*args)[0].astype(np.float64)
    ids, probs = session.forward_top(*args)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    reference = exp / exp.sum(-1, keepdims=True)
    np.testing.assert_array_equal(ids[0], np.argsort(-reference, axis=-1, kind="stable")[:, :k])
    np.testing.assert_allclose(probs[0], np.take_along_axis(reference, ids[0], -1), rtol=1e-5, atol=1e-7)


def test_sampling_with_drawn_children_still_reads_the_draft_logits(llama_self_bundle, monkeypatch):
    """Rule B draws children from the draft's whole distribution: the top tokens are not enough there."""
    gen = Generator.load(llama_self_bundle, provider="cpu")
    calls = []
    forward_top = DecoderSession.forward_top

    def counting(self, *args, **kwargs):
        calls.append(self)
        return forward_top(self, *args, **kwargs)

    monkeypatch.setattr(DecoderSession, "forward_top", counting)
    gen.generate("one two", max_new_tokens=12, mode="speculative", temperature=1.0, seed=3, draft_choice="sample",
                 ignore_eos=True)
    assert not calls
    gen.generate("one two", max_new_tokens=12, mode="speculative", ignore_eos=True)
    assert calls and all(s is gen.draft for s in calls)

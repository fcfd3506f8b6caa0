"""Verify passes padded to fixed bucket sizes (the shapes CUDA graphs capture): exactly the unpadded results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specx.exporter.validate import random_tree
from specx.runtime import Generator
from specx.runtime import decoding
from specx.runtime.decoding import feed
from specx.runtime.tree import TREE_BUCKETS, bucket_size, padded_pass
from tests.helpers import open_target


def test_bucket_size():
    assert bucket_size(1, TREE_BUCKETS, 100) == 1
    assert bucket_size(5, TREE_BUCKETS, 100) == 8
    assert bucket_size(9, TREE_BUCKETS, 100) == 16
    assert bucket_size(9, TREE_BUCKETS, 12) == 9  # no bucket fits the rows left: unpadded
    assert bucket_size(70, TREE_BUCKETS, 200) == 70


def test_a_padded_pass_gives_the_unpadded_logits_and_cache(llama_bundle):
    rng = np.random.default_rng(0)
    tree = random_tree(11, rng)
    session = open_target(llama_bundle)
    tokens = rng.integers(0, session.contract.vocab_size, tree.size).astype(np.int64)
    prefix = rng.integers(0, session.contract.vocab_size, 9).astype(np.int64)
    results = []
    for size in (tree.size, 16, 32):
        session.reset()
        feed(session, prefix)
        logits = session.forward(*padded_pass(tree, tokens, 9, size))[0, :tree.size]
        path = [int(n) for n in tree.path(tree.size - 1)]
        session.commit(path)
        cache = [v.numpy()[:, :, :session.past_len].copy() for v in session._cache]
        results.append((logits, cache))
    for logits, cache in results[1:]:
        np.testing.assert_allclose(logits, results[0][0], atol=1e-5)
        for got, want in zip(cache, results[0][1]):
            np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "draft_choice": "top"},
                                      {"temperature": 1.0, "draft_choice": "sample"}])
def test_padded_decoding_equals_unpadded(llama_self_bundle, mode, sampling, monkeypatch):
    """Every mode, both acceptance rules: the same tokens (same seed) and the same cache, to the context's end."""
    gen = Generator.load(llama_self_bundle, provider="cpu")
    ids = gen.bundle.tokenizer.encode("one two three").ids
    new = gen.max_positions - len(ids)
    kwargs = dict(max_new_tokens=new, mode=mode, ignore_eos=True, seed=11, tree_budget=6, tree_depth=3, **sampling)
    if mode == "ngram":
        kwargs.pop("draft_choice", None)
    plain = gen.generate(ids, **kwargs).tokens
    plain_cache = [v.numpy()[:, :, :gen.target.past_len].copy() for v in gen.target._cache]
    request_type = decoding.DecodeRequest
    padded_sizes = []

    def padded_request(*args, **fields):
        return dataclasses.replace(request_type(*args, **fields), tree_buckets=(8, 16, 32))

    verify = decoding.verify

    def recording_verify(target, drafted, greedy=False, size=None):
        padded_sizes.append((drafted.tokens.size, size))
        return verify(target, drafted, greedy, size)

    monkeypatch.setattr(decoding, "DecodeRequest", padded_request)
    monkeypatch.setattr(decoding, "verify", recording_verify)
    import specx.runtime.generator as generator_module
    monkeypatch.setattr(generator_module, "DecodeRequest", padded_request, raising=False)
    padded = gen.generate(ids, **kwargs).tokens
    assert padded == plain and len(padded) == new
    assert any(size and size > n for n, size in padded_sizes)  # passes really were padded
    for got, want in zip((v.numpy()[:, :, :gen.target.past_len] for v in gen.target._cache), plain_cache):
        np.testing.assert_allclose(got, want, atol=1e-5)

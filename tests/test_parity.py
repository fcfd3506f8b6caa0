"""ORT graphs vs PyTorch, and tree passes vs per-path passes, through the runtime's IO-binding sessions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from specx.exporter.adapters import adapter_for
from specx.exporter.validate import random_tree
from specx.exporter.wrapper import TreeDecoder
from specx.runtime.decoding import feed
from specx.runtime.tree import chain
from tests.helpers import open_target

ATOL = 1e-4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request, gpt2_bundle, gpt2_dir, llama_bundle, llama_dir):
    bundle, hf_dir = (gpt2_bundle, gpt2_dir) if request.param == "gpt2" else (llama_bundle, llama_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return open_target(bundle), TreeDecoder(model, adapter_for(model.config)).eval(), bundle


def _torch(wrapper, ids, pos, mask, past):
    with torch.no_grad():
        out = wrapper(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), *past)
    return out[0].numpy(), list(out[1:])


def _empty(session, batch=1):
    c = session.contract
    return [torch.zeros(batch, c.num_kv_heads, 0, c.head_dim) for _ in c.past_input_names]


def test_prefill_with_empty_past(case):
    session, wrapper, _ = case
    ids = np.array([[5, 17, 99, 3, 250, 41]], dtype=np.int64)
    run = chain(6)
    session.reset()
    ours = session.forward(ids, run.positions(0), run.attention_mask(0))
    ref, _ = _torch(wrapper, ids, run.positions(0), run.attention_mask(0), _empty(session))
    np.testing.assert_allclose(ours, ref, atol=ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_tree_with_non_empty_past(case, seed):
    session, wrapper, _ = case
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, session.contract.vocab_size, 9).astype(np.int64)
    tree = random_tree(11, rng)
    tokens = rng.integers(0, session.contract.vocab_size, tree.size).astype(np.int64)[None]
    session.reset()
    feed(session, prefix)
    ours = session.forward(tokens, tree.positions(9), tree.attention_mask(9))
    run = chain(9)
    _, past = _torch(wrapper, prefix[None], run.positions(0), run.attention_mask(0), _empty(session))
    ref, _ = _torch(wrapper, tokens, tree.positions(9), tree.attention_mask(9), past)
    np.testing.assert_allclose(ours, ref, atol=ATOL)


def test_batch_of_two_sequences(case):
    """Two prompts side by side, then one token each against their caches. (A multi-token pass against a non-empty
    cache is batch 1: ONNX Runtime's GroupQueryAttention allows no more, and decoding is batch 1.)"""
    session, wrapper, bundle = case
    batched = open_target(bundle, batch=2)
    rng = np.random.default_rng(7)
    c = session.contract
    past_len = 5
    prefix = rng.integers(0, c.vocab_size, (2, past_len)).astype(np.int64)
    tokens = rng.integers(0, c.vocab_size, (2, 1)).astype(np.int64)
    run, step = chain(past_len), chain(1)
    batched.reset()
    first = batched.forward(prefix, np.repeat(run.positions(0), 2, 0), np.repeat(run.attention_mask(0), 2, 0))
    batched.commit()
    second = batched.forward(tokens, np.repeat(step.positions(past_len), 2, 0),
                             np.repeat(step.attention_mask(past_len), 2, 0))
    ref_first, past = _torch(wrapper, prefix, np.repeat(run.positions(0), 2, 0),
                             np.repeat(run.attention_mask(0), 2, 0), _empty(session, 2))
    ref_second, _ = _torch(wrapper, tokens, np.repeat(step.positions(past_len), 2, 0),
                           np.repeat(step.attention_mask(past_len), 2, 0), past)
    np.testing.assert_allclose(first, ref_first, atol=ATOL)
    np.testing.assert_allclose(second, ref_second, atol=ATOL)


def test_tree_logits_equal_per_path_logits(case):
    session, _, _ = case
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, session.contract.vocab_size, 6).astype(np.int64)
    tree = random_tree(12, rng)
    tokens = rng.integers(0, session.contract.vocab_size, tree.size).astype(np.int64)
    session.reset()
    feed(session, prefix)
    tree_logits = session.forward(tokens[None], tree.positions(6), tree.attention_mask(6))[0]
    for node in range(tree.size):
        session.reset()
        path_logits = feed(session, np.concatenate([prefix, tokens[tree.path(node)]]))
        np.testing.assert_allclose(tree_logits[node], path_logits, atol=ATOL)


def test_commit_of_a_tree_path_equals_plain_feeding(case):
    session, _, _ = case
    rng = np.random.default_rng(11)
    c = session.contract
    prefix = rng.integers(0, c.vocab_size, 7).astype(np.int64)
    cached = prefix.copy()
    session.reset()
    feed(session, prefix)
    for _ in range(4):  # several steps, each keeping a different root-to-node path of a tree
        tree = random_tree(9, rng)
        tokens = rng.integers(0, c.vocab_size, tree.size).astype(np.int64)
        session.forward(tokens[None], tree.positions(session.past_len), tree.attention_mask(session.past_len))
        path = tree.path(int(rng.integers(0, tree.size)))
        session.commit(path)
        cached = np.concatenate([cached, tokens[path]])
    ours = session.cache_arrays()
    session.reset()
    feed(session, cached)
    plain = session.cache_arrays()
    assert ours[0].shape[2] == cached.size
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)

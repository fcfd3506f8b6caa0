"""Shared test helpers: open a bundle's target on the CPU through the runtime's own IO-binding path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from specx.runtime.bundle import Bundle
from specx.runtime.decoding import feed
from specx.runtime.generator import Generator, _decoder
from specx.runtime.sampling import SamplingConfig, target_distribution
from specx.runtime.session import DecoderSession
from tests import tiny_models

SAMPLES = 1500  # Monte Carlo runs per distribution test


CACHE_ROWS = 2 * tiny_models.CONTEXT  # reserved cache rows for tests that drive sessions directly


def open_target(bundle_dir: Path, batch: int = 1) -> DecoderSession:
    bundle = Bundle.load(bundle_dir)
    session = _decoder(bundle, bundle.manifest.target, "cpu")
    if batch != 1:
        session = DecoderSession(session._decoder, session._committer, session.contract, session.placement, batch=batch)
    session.reserve(CACHE_ROWS)
    return session


def open_draft(bundle_dir: Path) -> DecoderSession:
    bundle = Bundle.load(bundle_dir)
    session = _decoder(bundle, bundle.manifest.draft, "cpu")
    session.reserve(CACHE_ROWS)
    return session


def exact_first_two(gen: Generator, prompt_ids: list[int], sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Exact marginals of the first and second sampled tokens of plain sampling, from the target graph."""
    target = gen.target
    target.reset()
    target.reserve(CACHE_ROWS)
    p1 = target_distribution(feed(target, np.asarray(prompt_ids, dtype=np.int64)), sampling)
    p2 = np.zeros_like(p1)
    for token in np.flatnonzero(p1 > 0):
        target.reset()
        logits = feed(target, np.asarray(prompt_ids + [int(token)], dtype=np.int64))
        p2 += p1[token] * target_distribution(logits, sampling)
    return p1, p2


def assert_first_two_tokens_follow_the_model(gen: Generator, mode: str, seed_base: int, draft_choice: str = "auto",
                                             tree_budget: int = 6, **kwargs: float) -> None:
    """Monte Carlo over seeds: the first two tokens of ``mode`` follow the exact distribution of plain sampling,
    within a total-variation bound derived from the sample size. ``tree_budget`` 3 (the depth): chains."""
    prompt = gen.bundle.tokenizer.encode("one two").ids
    p1, p2 = exact_first_two(gen, prompt, SamplingConfig(**kwargs))
    firsts, seconds = np.zeros_like(p1), np.zeros_like(p2)
    for seed in range(SAMPLES):
        tokens = gen.generate(prompt, max_new_tokens=2, ignore_eos=True, mode=mode, tree_budget=tree_budget, tree_depth=3,
                              seed=seed_base + seed, draft_choice=draft_choice, **kwargs).tokens
        firsts[tokens[0]] += 1
        seconds[tokens[1]] += 1
    for exact, counts in ((p1, firsts), (p2, seconds)):
        tv = 0.5 * np.abs(counts / SAMPLES - exact).sum()
        # E[TV] <= 1/2 sum sqrt(p(1-p)/n); McDiarmid adds sqrt(2 ln(1/delta) / n) at confidence 1 - delta (1e-3).
        bound = 0.5 * np.sqrt(exact * (1 - exact) / SAMPLES).sum() + np.sqrt(2 * np.log(1e3) / SAMPLES)
        assert tv < bound, (tv, bound)

"""The Katz backoff trigram model: normalisation, backoff, storage, online counts."""

from __future__ import annotations

import numpy as np
import pytest

from specx.errors import BundleError
from specx.runtime.ngram import KatzTrigram, SessionNgram, _good_turing

VOCAB = 40


@pytest.fixture(scope="module")
def model() -> KatzTrigram:
    rng = np.random.default_rng(0)
    zipf = np.minimum(rng.zipf(1.6, 3000), VOCAB - 5) - 1  # skewed: frequent and rare tokens, 4 never seen
    return KatzTrigram.fit([zipf, np.tile([1, 2, 3, 4], 50), [7, 8, 9]], VOCAB)


def test_every_context_sums_to_one(model):
    for u in [None, *range(VOCAB)]:
        for v in [None, *range(VOCAB)]:
            if u is not None and v is None:
                continue
            p = model.distribution(u, v)
            assert abs(p.sum() - 1.0) < 1e-9 and np.all(p > 0), (u, v)


def test_backoff_for_unseen_contexts(model):
    unseen_v = VOCAB - 1  # never in the data
    np.testing.assert_array_equal(model.distribution(3, unseen_v), model.distribution(None, unseen_v))
    np.testing.assert_array_equal(model.distribution(None, unseen_v), model.unigram)
    # a seen context, an unseen continuation: alpha(u v) * P(w | v)
    ctx = model.trigram.find(1 * VOCAB + 2)
    seen = set(model.trigram.entries(ctx)[0].tolist())
    w = next(t for t in range(VOCAB) if t not in seen)
    expected = model.trigram.alpha[ctx] * model.distribution(None, 2)[w]
    assert model.distribution(1, 2)[w] == pytest.approx(expected)


def test_repeated_pattern_is_learned(model):
    assert model.best(1, 2) == 3 and model.best(2, 3) == 4 and model.best(3, 4) == 1


def test_good_turing_discounts_are_proper():
    counts = np.random.default_rng(1).zipf(1.5, 5000)
    d = _good_turing(counts)
    assert np.all(d[1:6] > 0) and np.all(d[1:6] <= 1)


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "ngram.npz"
    model.save(path)
    loaded = KatzTrigram.load(path, VOCAB)
    for u, v in [(1, 2), (None, 5), (None, None), (30, 31)]:
        np.testing.assert_array_equal(loaded.distribution(u, v), model.distribution(u, v))


def test_loading_never_unpickles(model, tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, format_version=np.asarray([{"x": 1}], dtype=object))
    with pytest.raises(BundleError):
        KatzTrigram.load(path)


@pytest.mark.parametrize("corruption", ["garbage", "offsets", "missing", "tokens", "vocab"])
def test_corrupt_files_are_clear_errors(model, tmp_path, corruption):
    path = tmp_path / "ngram.npz"
    model.save(path)
    if corruption == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        arrays = dict(np.load(path))
        if corruption == "offsets":
            arrays["trigram_offsets"] = arrays["trigram_offsets"][::-1].copy()
        elif corruption == "missing":
            del arrays["bigram_alpha"]
        elif corruption == "tokens":
            arrays["bigram_tokens"] = arrays["bigram_tokens"] + VOCAB
        np.savez(path, **arrays)
    with pytest.raises(BundleError, match="n-gram table"):
        KatzTrigram.load(path, VOCAB + (1 if corruption == "vocab" else 0))


def test_session_counts_take_priority_and_grow_online(model):
    session = SessionNgram(model)
    session.update([20, 21, 22, 20, 21])
    assert session.propose([20, 21], 4) == [22, 20, 21, 22]
    session.update([20, 21, 22, 20, 21, 23, 20, 21, 23, 20, 21])  # the prompt plus new tokens
    assert session.next_token(20, 21) == 23  # seen twice now, more than 22
    static_only = SessionNgram(model, online=False)
    static_only.update([20, 21, 22, 20, 21])
    assert static_only.propose([20, 21], 1) == [model.best(20, 21)]


def test_queries_are_fast(model):
    import time

    session = SessionNgram(model)
    session.update(list(range(30)))
    start = time.perf_counter()
    for i in range(2000):
        session.propose([i % VOCAB, (i * 7) % VOCAB], 4)
    per_token = (time.perf_counter() - start) / 8000
    assert per_token < 2e-4  # far below one draft call (milliseconds)

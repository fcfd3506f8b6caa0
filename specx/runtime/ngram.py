"""A Katz backoff trigram model over token ids (draft2 of staged decoding), numpy only.

Estimation (Katz 1987): counts r <= GT_MAX_COUNT get Good-Turing discounts d_r, larger counts none; the mass taken
from seen continuations goes to unseen ones through a backoff weight, so every context's distribution sums to 1::

    P(w | u v) = d(c) c(u v w) / c(u v .)              if c(u v w) > 0
               = alpha(u v) P(w | v)                     otherwise        (alpha = 1 for an unseen context)
    P(w | v)   = d(c) c(v w) / c(v .)  or  alpha(v) P(w)
    P(w)       = (c(w) + UNIGRAM_PSEUDOCOUNT) / (N + V UNIGRAM_PSEUDOCOUNT)

Stored as plain arrays (npz, loaded with allow_pickle=False: loading runs no code). Per order: sorted context keys,
CSR offsets into continuation tokens and discounted probabilities (sorted by probability within a context), and
backoff weights.

``SessionNgram`` adds what decoding sees: counts of the prompt and the generated tokens, updated online and consulted
first, so that spans repeated in the context (code, logs, lists) are proposed from the context itself.
"""

from __future__ import annotations

import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from specx.errors import BundleError

FORMAT_VERSION = 1
# Export default: no table. A table of 8,192 tokens sampled at temperature 1.5 (the paper's recipe) made staged decoding
# slower on SmolLM2 (1.17x vs 1.25x over plain, greedy) than counting the context alone; one of 25,000 tokens of the
# target's own text (specx.exporter.ngram_build) raised int4 n-gram 1-chains' tau from 1.27 to 1.37, at the same speed
# within noise and ~2 minutes more export: docs/benchmarks.md. `--ngram-tokens N` / `--ngram-corpus` add one.
DEFAULT_SAMPLE_TOKENS = 0
GT_MAX_COUNT = 5  # Katz: counts above this are reliable and not discounted
UNIGRAM_PSEUDOCOUNT = 0.5
FALLBACK_DISCOUNT = 0.75  # used where Good-Turing estimates are degenerate (tiny corpora)


@dataclass(frozen=True)
class _Order:
    """One order's continuation table: context key -> (tokens, discounted probabilities), plus backoff weights."""

    keys: np.ndarray  # (contexts,) int64, sorted
    offsets: np.ndarray  # (contexts + 1,) int64
    tokens: np.ndarray  # (entries,) int64
    probs: np.ndarray  # (entries,) float64, descending within a context
    alpha: np.ndarray  # (contexts,) float64

    def find(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        return i if i < self.keys.size and self.keys[i] == key else -1

    def entries(self, ctx: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[ctx], self.offsets[ctx + 1]
        return self.tokens[lo:hi], self.probs[lo:hi]


class KatzTrigram:
    def __init__(self, vocab_size: int, unigram: np.ndarray, bigram: _Order, trigram: _Order):
        self.vocab_size = vocab_size
        self.unigram = unigram
        self.bigram = bigram
        self.trigram = trigram
        self._unigram_best = int(np.argmax(unigram))

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], vocab_size: int) -> "KatzTrigram":
        uni = np.zeros(vocab_size, dtype=np.float64)
        bi_keys, tri_keys = [], []
        v = np.int64(vocab_size)
        for seq in sequences:
            a = np.asarray(seq, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise ValueError("token ids outside the vocabulary")
            np.add.at(uni, a, 1.0)
            if a.size >= 2:
                bi_keys.append(a[:-1] * v + a[1:])
            if a.size >= 3:
                tri_keys.append((a[:-2] * v + a[1:-1]) * v + a[2:])
        unigram = (uni + UNIGRAM_PSEUDOCOUNT) / (uni.sum() + vocab_size * UNIGRAM_PSEUDOCOUNT)
        bigram = _estimate(_concat(bi_keys), v, lambda ctx, tok: unigram[tok])
        trigram = _estimate(_concat(tri_keys), v,
                            lambda ctx, tok: _bigram_prob(bigram, unigram, ctx % v, tok))
        return cls(vocab_size, unigram, bigram, trigram)

    # -- queries -------------------------------------------------------------------------------------------------
    def distribution(self, u: int | None, v: int | None) -> np.ndarray:
        """P(. | u v) over the whole vocabulary (u or v None: shorter context). Shape (vocab,) float64."""
        probs = self.unigram.copy()
        if v is None:
            return probs
        probs = _apply(self.bigram, v, probs)
        if u is None:
            return probs
        return _apply(self.trigram, u * self.vocab_size + v, probs)

    def best(self, u: int | None, v: int | None) -> int:
        """The most likely next token after ``u v``."""
        return int(np.argmax(self.distribution(u, v)))

    # -- storage -------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        arrays = {"format_version": np.asarray(FORMAT_VERSION), "vocab_size": np.asarray(self.vocab_size),
                  "unigram": self.unigram}
        for name, order in (("bigram", self.bigram), ("trigram", self.trigram)):
            for field_name in ("keys", "offsets", "tokens", "probs", "alpha"):
                arrays[f"{name}_{field_name}"] = getattr(order, field_name)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: Path, vocab_size: int | None = None) -> "KatzTrigram":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise BundleError(f"n-gram table {path} is unreadable ({exc}); re-export the bundle") from exc
        try:
            version = int(arrays["format_version"])
            if version != FORMAT_VERSION:
                raise BundleError(f"n-gram table {path} has format {version}, this specx reads {FORMAT_VERSION}")
            size = int(arrays["vocab_size"])
            orders = [_Order(*(arrays[f"{name}_{f}"] for f in ("keys", "offsets", "tokens", "probs", "alpha")))
                      for name in ("bigram", "trigram")]
            model = cls(size, arrays["unigram"], *orders)
        except KeyError as exc:
            raise BundleError(f"n-gram table {path} is corrupt (missing {exc}); re-export the bundle") from exc
        model._check(path)
        if vocab_size is not None and model.vocab_size != vocab_size:
            raise BundleError(f"n-gram table {path} is for a vocabulary of {model.vocab_size}, not {vocab_size}")
        return model

    def _check(self, path: Path) -> None:
        def bad(why: str) -> BundleError:
            return BundleError(f"n-gram table {path} is corrupt ({why}); re-export the bundle")

        if self.unigram.shape != (self.vocab_size,) or not np.isclose(self.unigram.sum(), 1.0):
            raise bad("unigram")
        for order in (self.bigram, self.trigram):
            n = order.keys.size
            if order.offsets.shape != (n + 1,) or order.alpha.shape != (n,) or order.offsets[0] != 0:
                raise bad("table shapes")
            if np.any(np.diff(order.offsets) < 0) or order.offsets[-1] != order.tokens.size:
                raise bad("offsets")
            if order.tokens.shape != order.probs.shape or np.any(np.diff(order.keys) <= 0):
                raise bad("keys")
            if order.tokens.size and (order.tokens.min() < 0 or order.tokens.max() >= self.vocab_size):
                raise bad("token ids")
            if np.any(order.probs < 0) or np.any(order.alpha < 0):
                raise bad("probabilities")


class SessionNgram:
    """The Katz model plus online counts of the current sequence, which take priority for proposals."""

    def __init__(self, static: KatzTrigram | None, online: bool = True):
        self.static = static
        self.online = online  # False: the static table alone (for ablations)
        self._tri: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
        self._bi: dict[int, dict[int, int]] = defaultdict(dict)
        self._sequence: list[int] = []  # the tokens counted so far
        self._static_best: dict[tuple[int | None, int], int] = {}  # the static model never changes: memoise
        self.seconds = 0.0  # time spent proposing

    def update(self, sequence: Sequence[int]) -> None:
        """Count the new tail of ``sequence`` (the prompt, then the generated tokens as they are committed)."""
        if not self.online:
            return
        start = len(self._sequence)
        self._sequence.extend(sequence[start:])
        seq = self._sequence
        for i in range(max(start, 1), len(seq)):
            bi = self._bi[seq[i - 1]]
            bi[seq[i]] = bi.get(seq[i], 0) + 1
            if i >= 2:
                tri = self._tri[(seq[i - 2], seq[i - 1])]
                tri[seq[i]] = tri.get(seq[i], 0) + 1

    def next_token(self, u: int | None, v: int) -> int | None:
        if u is not None and (u, v) in self._tri:
            counts = self._tri[(u, v)]
            return max(counts, key=counts.__getitem__)
        if self.static is not None:
            key = (u, v)
            if key not in self._static_best:
                self._static_best[key] = self.static.best(u, v)
            return self._static_best[key]
        counts = self._bi.get(v)
        return max(counts, key=counts.__getitem__) if counts else None

    def propose(self, context: Sequence[int], length: int) -> list[int]:
        """A greedy chain of up to ``length`` tokens continuing ``context``."""
        start = time.perf_counter()
        out: list[int] = []
        u = context[-2] if len(context) >= 2 else None
        v = context[-1]
        for _ in range(length):
            token = self.next_token(u, v)
            if token is None:
                break
            out.append(token)
            u, v = v, token
        self.seconds += time.perf_counter() - start
        return out


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _good_turing(counts: np.ndarray) -> np.ndarray:
    """Katz discount ratios d_r for r = 0..GT_MAX_COUNT+1 (index r); 1 above GT_MAX_COUNT."""
    k = GT_MAX_COUNT
    n = np.bincount(counts, minlength=k + 2).astype(np.float64)
    d = np.ones(k + 2)
    if n[1] > 0:
        common = (k + 1) * n[k + 1] / n[1]
        for r in range(1, k + 1):
            if n[r] > 0 and n[r + 1] > 0 and common < 1:
                d[r] = ((r + 1) * n[r + 1] / (r * n[r]) - common) / (1 - common)
    bad = (d[1:k + 1] <= 0) | (d[1:k + 1] >= 1)
    d[1:k + 1][bad] = np.maximum(0.0, 1 - FALLBACK_DISCOUNT / np.arange(1, k + 1)[bad])
    d[1] = d[1] if d[1] > 0 else 0.25
    return d


def _estimate(keys: np.ndarray, v: np.int64, lower) -> _Order:  # noqa: ANN001
    """Discounted continuation probabilities and backoff weights for one order from its n-gram keys."""
    if keys.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Order(empty, np.zeros(1, dtype=np.int64), empty, np.zeros(0), np.zeros(0))
    grams, counts = np.unique(keys, return_counts=True)
    ctx, tok = grams // v, grams % v
    d = _good_turing(counts)
    discount = np.where(counts <= GT_MAX_COUNT, d[np.minimum(counts, GT_MAX_COUNT + 1)], 1.0)
    contexts = np.unique(ctx)
    ctx_index = np.searchsorted(contexts, ctx)
    totals = np.bincount(ctx_index, weights=counts.astype(np.float64))
    probs = discount * counts / totals[ctx_index]
    lower_seen = np.asarray([lower(c, t) for c, t in zip(ctx, tok)], dtype=np.float64)
    left = 1.0 - np.bincount(ctx_index, weights=probs)
    lower_left = 1.0 - np.bincount(ctx_index, weights=lower_seen)
    alpha = np.where(lower_left > 1e-12, np.maximum(left, 0.0) / np.maximum(lower_left, 1e-12), 0.0)
    # where nothing is left below (the context saw every token), give the left mass back to the seen ones
    rescale = np.where(lower_left > 1e-12, 1.0, 1.0 / np.maximum(1.0 - left, 1e-300))
    probs = probs * rescale[ctx_index]
    order = np.lexsort((-probs, ctx_index))  # by context, then probability descending
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ctx_index))]).astype(np.int64)
    return _Order(contexts.astype(np.int64), offsets, tok[order].astype(np.int64), probs[order], alpha)


def _bigram_prob(bigram: _Order, unigram: np.ndarray, v: int, w: int) -> float:
    ctx = bigram.find(int(v))
    if ctx < 0:
        return float(unigram[w])
    tokens, probs = bigram.entries(ctx)
    hit = np.flatnonzero(tokens == w)
    return float(probs[hit[0]]) if hit.size else float(bigram.alpha[ctx] * unigram[w])


def _apply(order: _Order, key: int, lower: np.ndarray) -> np.ndarray:
    ctx = order.find(int(key))
    if ctx < 0:
        return lower
    tokens, probs = order.entries(ctx)
    out = lower * order.alpha[ctx]
    out[tokens] = probs
    return out

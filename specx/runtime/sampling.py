"""Logit processing and token choice, the same for plain and speculative decoding.

Processing follows transformers' order and tie rules (temperature, then top-k, then top-p) and runs in float64, so
that speculative acceptance can use exactly the distribution plain decoding samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specx.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InvalidArgumentError(f"seed must be an integer >= 0 (or none, for a fresh random seed), got "
                                       f"{self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_distribution(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution plain decoding samples from: processed logits -> float64 probabilities, shape (vocab,)."""
    if config.greedy:
        probs = np.zeros(logits.shape[-1], dtype=np.float64)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    scores = logits.astype(np.float64) / config.temperature
    if config.top_k and config.top_k < scores.size:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if config.top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, like transformers' TopPLogitsWarper
        ascending = softmax(scores[order])
        remove = np.cumsum(ascending) <= 1.0 - config.top_p
        remove[-1] = False  # always keep the most likely token
        scores[order[remove]] = -np.inf
    return softmax(scores)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from float64 probabilities (inverse CDF: one uniform draw)."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, probs.size - 1)


def choose_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """Plain decoding's choice for one position's logits (vocab,)."""
    if config.greedy:
        return int(np.argmax(logits))
    return sample(target_distribution(logits, config), rng)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from one row of scores (-inf allowed), computed stably."""
    shifted = np.exp(scores - np.max(scores))
    return shifted / shifted.sum()

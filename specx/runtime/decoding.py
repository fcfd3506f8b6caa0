"""Decoding loops. Each is a generator of token ids that reads top to bottom from small named steps.

The caller owns timing and statistics; the loops only drive sessions and choose tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from specx.runtime.sampling import SamplingConfig, choose_token
from specx.runtime.session import DecoderSession
from specx.runtime.tree import chain


@dataclass(frozen=True)
class DecodeRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]  # empty when EOS is ignored


def feed(session: DecoderSession, tokens: np.ndarray) -> np.ndarray:
    """Run a straight run of tokens (prompt or accepted tokens) through a decoder and commit it all.

    Returns the logits of the last token, shape (vocab,).
    """
    run = chain(tokens.size)
    logits = session.forward(
        tokens.reshape(1, -1),  # (1, seq)
        run.positions(session.past_len),  # (1, seq)
        run.attention_mask(session.past_len),  # (1, 1, seq, past+seq)
    )
    session.commit()
    return logits[0, -1]


def autoregressive(target: DecoderSession, request: DecodeRequest, rng: np.random.Generator) -> Iterator[int]:
    """Plain decoding: one target pass per token."""
    logits = feed(target, np.asarray(request.prompt_ids, dtype=np.int64))
    for produced in range(1, request.max_new_tokens + 1):
        token = choose_token(logits, request.sampling, rng)
        yield token
        if token in request.stop_ids or produced == request.max_new_tokens:
            return
        logits = feed(target, np.asarray([token], dtype=np.int64))

"""Decoding with a trained feature draft (EAGLE-style): the draft reads the target's own features.

    target pass (prefill or verify) --features (rows, F)--> FeatureLog, by absolute position
    step's first draft call: the committed tokens the draft has not seen, each with the target's features of the
        position before it (zeros where there are none: position 0, or a prefix reused from an earlier turn)
    each further tree level: the frontier nodes, each with its parent's hidden state (the draft's own output)
    after verification: the accepted tokens' features are logged; the draft's tree rows are dropped, so the next
        first call runs the accepted tokens again with the target's features (what the draft was trained on)

Only which tokens are proposed depends on the draft; acceptance (rule A) keeps the output exactly plain decoding's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import numpy as np

from specx.errors import ContractError
from specx.graphs.contract import FEATURES, HIDDEN, HIDDEN_STATES
from specx.runtime.drafting import DraftPass, draft_pass
from specx.runtime.session import DecoderSession


class FeatureDraft:
    """A feature draft session and its vocabulary map, as ``grow_tree`` drives it (a ``DraftModel``)."""

    def __init__(self, session: DecoderSession, vocab_map: np.ndarray):
        self.session = session
        self.vocab_map = vocab_map
        contract = session.contract
        self._no_features = np.zeros((1, 0, contract.feature_width), np.float32)  # (batch, feature_rows=0, F)
        self._no_hidden = np.zeros((1, 0, contract.hidden_size), np.float32)  # (batch, hidden_rows=0, hidden)
        self.pending_features = self._no_features[0]  # (rows, F): set by the drafter before each step

    def first(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, top: int = 0) -> DraftPass:
        feeds = {FEATURES: self.pending_features[None], HIDDEN: self._no_hidden}
        return self._pass(tokens, positions, mask, feeds, top)

    def level(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
              states: np.ndarray | None, top: int = 0) -> DraftPass:
        if states is None:
            raise ValueError("a feature draft's tree level needs its parents' hidden states")
        return self._pass(tokens, positions, mask, {FEATURES: self._no_features, HIDDEN: states}, top)

    def _pass(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
              feeds: dict[str, np.ndarray], top: int) -> DraftPass:
        out = draft_pass(self.session, tokens, positions, mask, top, feeds)  # logits (rows, K) or top tokens
        return replace(out, hidden=self.session.outputs[HIDDEN_STATES][0].copy())  # (rows, hidden)


class FeatureLog:
    """The target's features by absolute position, kept until the draft has read them."""

    def __init__(self, width: int):
        self.width = width
        self._rows: dict[int, np.ndarray] = {}

    def record(self, first_position: int, rows: np.ndarray) -> None:
        """rows (n, width): the features of positions first_position, first_position + 1, ... (copied)."""
        for offset, row in enumerate(np.array(rows, dtype=np.float32, copy=True)):
            self._rows[first_position + offset] = row

    def take(self, positions: Iterable[int]) -> np.ndarray:
        """(len(positions), width): the logged rows, zeros where none was logged."""
        positions = list(positions)
        out = np.zeros((len(positions), self.width), np.float32)
        for k, position in enumerate(positions):
            row = self._rows.get(position)
            if row is not None:
                out[k] = row
        return out

    def forget_before(self, position: int) -> None:
        for old in [p for p in self._rows if p < position]:
            del self._rows[old]

    def clear(self) -> None:
        self._rows.clear()


def check_feature_draft(target: DecoderSession, draft: DecoderSession, vocab_map: np.ndarray) -> None:
    """A feature draft must fit its target: feature width, and a map into the target's vocabulary."""
    t, d = target.contract, draft.contract
    if t.feature_width != d.feature_width:
        raise ContractError(f"the draft reads features {d.feature_width} wide but the target graph gives "
                            f"{t.feature_width or 'none'}; retrain the draft with `specx train-draft`")
    if vocab_map.ndim != 1 or vocab_map.size != d.vocab_size:
        raise ContractError(f"the draft's vocabulary map has {vocab_map.size} entries for {d.vocab_size} draft "
                            "logits; retrain the draft with `specx train-draft`")
    if np.any(vocab_map < 0) or np.any(vocab_map >= t.vocab_size) or np.unique(vocab_map).size != vocab_map.size:
        raise ContractError(f"the draft's vocabulary map must hold distinct target ids in [0, {t.vocab_size}); "
                            "retrain the draft with `specx train-draft`")

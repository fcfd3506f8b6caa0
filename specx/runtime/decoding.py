"""Decoding loops. Each is a generator of token ids that reads top to bottom from small named steps.

The caller owns timing and statistics; the loops only drive sessions and choose tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from specx.runtime.acceptance import Acceptance, accept, accept_greedy
from specx.graphs.contract import FEATURES
from specx.runtime.drafting import DraftModel, DraftSampler, DraftTree, StageTwoLog, TreeShape, grow_tree
from specx.runtime.feature_draft import FeatureDraft, FeatureLog
from specx.runtime.ngram import SessionNgram
from specx.runtime.sampling import SamplingConfig, choose_token
from specx.runtime.session import DecoderSession
from specx.runtime.tree import bucket_size, chain, padded_pass


@dataclass(frozen=True)
class DecodeRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]  # empty when EOS is ignored
    max_positions: int  # the target's context
    tree_buckets: tuple[int, ...] = ()  # verify passes padded to these sizes (fixed shapes for CUDA graphs); () none


@dataclass
class StepLog:
    """What the speculative loop did, step by step (the caller turns it into statistics)."""

    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per target call
    verified: list[int] = field(default_factory=list)  # draft nodes per target call
    planned_draft_calls: int = 0  # draft calls tree speculation without stage 2 would make (depth per step)
    stage_two: StageTwoLog = field(default_factory=StageTwoLog)


def feed(session: DecoderSession, tokens: np.ndarray) -> np.ndarray:
    """Run a straight run of tokens (prompt or accepted tokens) through a decoder and commit it all.

    Returns the logits of the last token, shape (vocab,).
    """
    return _committed_run(session.forward, session, tokens)[0, -1]


def _committed_run(run_pass, session: DecoderSession, tokens: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """``run_pass`` (session.forward or forward_tokens) over a straight run of tokens, committed; its output."""
    run = chain(tokens.size)
    out = run_pass(
        tokens.reshape(1, -1),  # (1, seq)
        run.positions(session.past_len),  # (1, seq)
        run.attention_mask(session.past_len),  # (1, 1, seq, past+seq)
    )
    session.commit()
    return out


def prefill(session: DecoderSession, tokens: np.ndarray) -> None:
    """``feed`` whose logits nobody reads (the rows before a tree's root): only the argmax row leaves the graph, not
    (seq, vocab) logits (20 MB for a 100-token prompt over a 49k vocabulary)."""
    _committed_run(session.forward_tokens, session, tokens)


def feed_next(session: DecoderSession, tokens: np.ndarray, sampling: SamplingConfig,
              rng: np.random.Generator) -> int:
    """``feed``, then plain decoding's choice of the next token. Greedy takes the graph's own argmax
    (``next_tokens``): the logits stay on the device."""
    if sampling.greedy:
        return int(_committed_run(session.forward_tokens, session, tokens)[0, -1])  # ids (1, seq)
    return choose_token(feed(session, tokens), sampling, rng)


def autoregressive(target: DecoderSession, request: DecodeRequest, rng: np.random.Generator) -> Iterator[int]:
    """Plain decoding: one target pass per token. Cached rows the prompt starts with are reused."""
    cached = target.reuse(request.prompt_ids[:-1])  # at least the last prompt token is fed: its logits are needed
    token = feed_next(target, np.asarray(request.prompt_ids[cached:], dtype=np.int64), request.sampling, rng)
    for produced in range(1, request.max_new_tokens + 1):
        yield token
        if token in request.stop_ids or produced == request.max_new_tokens:
            return
        token = feed_next(target, np.asarray([token], dtype=np.int64), request.sampling, rng)


class ModelDrafter:
    """Drafts with a draft model (tree speculative), optionally sped up by an n-gram proposer (staged)."""

    def __init__(self, model: DraftModel, ngram: SessionNgram | None, log: StepLog, max_rows: int | None = None):
        self.model = model
        self.session = model.session
        self.ngram = ngram
        self.log = log
        self.max_rows = max_rows  # the rows a draft pass may reach (the context): the tree shrinks to fit

    def prefilled(self, target: DecoderSession, first_position: int) -> None:
        """The target just ran the prompt from ``first_position`` on (nothing to take from it here)."""

    def start(self, committed: list[int]) -> None:
        """Keep the draft's cached rows that the prompt starts with (the root itself is always fed)."""
        self.session.reuse(committed[:-1])

    def draft(self, committed: list[int], shape: TreeShape, sampler: DraftSampler | None = None) -> DraftTree:
        """Grow the tree from the last committed token; the draft first catches up on tokens it has not seen.
        With a ``sampler`` the children are drawn from the draft (stage 2 then proposes nothing)."""
        pending = np.asarray(committed[self.session.past_len:], dtype=np.int64)
        self.log.planned_draft_calls += shape.depth
        if self.ngram is None or sampler is not None:
            return grow_tree(self.model, pending, shape, sampler=sampler, max_rows=self.max_rows)
        self.ngram.update(committed)
        return grow_tree(self.model, pending, shape, self.ngram.propose, committed, self.log.stage_two,
                         max_rows=self.max_rows)

    def commit(self, target: DecoderSession, drafted: DraftTree, result: Acceptance, committed_len: int) -> None:
        """Keep the committed tokens and the accepted nodes the draft has processed (a prefix of the path)."""
        kept = [drafted.slots[n] for n in result.path if n in drafted.slots]
        self.session.select(np.concatenate([np.arange(committed_len, dtype=np.int64),
                                            np.asarray(kept, dtype=np.int64)]))


class FeatureDrafter(ModelDrafter):
    """Drafts with a trained feature draft: its first call each step reads the target's features of the tokens
    committed since (``specx.runtime.feature_draft``)."""

    def __init__(self, model: FeatureDraft, ngram: SessionNgram | None, log: StepLog, max_rows: int | None = None):
        super().__init__(model, ngram, log, max_rows)
        self.model: FeatureDraft = model
        self.features = FeatureLog(model.session.contract.feature_width)

    def prefilled(self, target: DecoderSession, first_position: int) -> None:
        self.features.clear()
        self.features.record(first_position, target.outputs[FEATURES][0])  # (rows, F)

    def draft(self, committed: list[int], shape: TreeShape, sampler: DraftSampler | None = None) -> DraftTree:
        first = self.session.past_len  # pending tokens at [first, len): each reads the features of the one before
        self.model.pending_features = self.features.take(range(first - 1, len(committed) - 1))
        return super().draft(committed, shape, sampler)

    def commit(self, target: DecoderSession, drafted: DraftTree, result: Acceptance, committed_len: int) -> None:
        """Log the target's features of the root and the accepted nodes; drop the draft's tree rows (the accepted
        tokens run again next step, with those features)."""
        rows = target.outputs[FEATURES][0][[0, *result.path]]  # (1 + accepted, F)
        self.features.record(committed_len - 1, rows)
        self.features.forget_before(committed_len - 1)
        self.session.rewind(committed_len)


class NgramDrafter:
    """Drafts a chain with the n-gram model alone (no draft model: like prompt lookup decoding)."""

    def __init__(self, ngram: SessionNgram, log: StepLog):
        self.ngram = ngram
        self.log = log

    def start(self, committed: list[int]) -> None:
        """No model cache to prepare."""

    def draft(self, committed: list[int], shape: TreeShape, sampler: DraftSampler | None = None) -> DraftTree:
        """An n-gram chain: deterministic proposals whatever the sampler (rule A)."""
        self.ngram.update(committed)
        proposal = self.ngram.propose(committed, shape.depth)
        self.log.stage_two.proposed += len(proposal)
        tokens = np.asarray([committed[-1], *proposal], dtype=np.int64)
        return DraftTree(tokens, chain(tokens.size), {})

    def prefilled(self, target: DecoderSession, first_position: int) -> None:
        """Nothing to take from the target's prompt pass."""

    def commit(self, target: DecoderSession, drafted: DraftTree, result: Acceptance, committed_len: int) -> None:
        self.log.stage_two.accepted += len(result.path)


Drafter = ModelDrafter | NgramDrafter


def speculative(target: DecoderSession, drafter: Drafter, request: DecodeRequest, shape: TreeShape,
                rng: np.random.Generator, log: StepLog, draw_children: bool = False) -> Iterator[int]:
    """Tree speculative decoding: draft a tree, verify it in one target pass, accept, commit.

    ``draw_children`` (sampling only): the draft's children are draws from its distribution, accepted by rule B;
    otherwise its top tokens, accepted by rule A (``specx.runtime.acceptance``).

    Invariant between steps: the target's cache holds the committed tokens except the last one (the root of the
    next tree); the draft's may lag behind by a few tokens, which it catches up on in its first call of a step.
    """
    committed = list(request.prompt_ids)
    cached = target.reuse(committed[:-1])  # cached rows the prompt starts with are reused
    if len(committed) - 1 > cached:
        prefill(target, np.asarray(committed[cached:-1], dtype=np.int64))
        drafter.prefilled(target, cached)
    drafter.start(committed)
    sampler = DraftSampler(request.sampling, rng) if draw_children and not request.sampling.greedy else None
    produced = 0
    while True:
        remaining = request.max_new_tokens - produced
        room = request.max_positions - len(committed)  # positions left after the root's
        # the verify pass holds the root and the nodes after the committed rows: at most `room` nodes fit the graph
        drafted = drafter.draft(committed, shape.limited(min(remaining - 1, room), room), sampler)
        log.verified.append(drafted.tokens.size - 1)
        room = min(request.max_positions, target.capacity) - target.past_len  # rows a padded pass may fill
        size = bucket_size(drafted.tokens.size, request.tree_buckets, room)
        if request.sampling.greedy:  # only each node's argmax leaves the device
            result = accept_greedy(drafted.tree, drafted.tokens, verify(target, drafted, greedy=True, size=size))
        else:
            result = accept(drafted.tree, drafted.tokens, verify(target, drafted, size=size), request.sampling, rng,
                            drafted.sampled)
        target.commit([0, *result.path])  # root + accepted nodes, in path order
        drafter.commit(target, drafted, result, len(committed))
        log.accepted.append(len(result.path))
        for token in [*(int(drafted.tokens[n]) for n in result.path), result.next_token]:
            yield token
            produced += 1
            committed.append(token)
            if token in request.stop_ids or produced == request.max_new_tokens:
                return


def verify(target: DecoderSession, drafted: DraftTree, greedy: bool = False, size: int | None = None) -> np.ndarray:
    """ONE target pass over every node: logits (n, vocab), or for ``greedy`` each node's argmax (n,). ``size`` >
    n pads the pass with dummy rows (``padded_pass``), whose outputs are dropped here."""
    tree, n = drafted.tree, drafted.tokens.size
    run = target.forward_tokens if greedy else target.forward
    if size is not None and size > n:
        return run(*padded_pass(tree, drafted.tokens, target.past_len, size))[0, :n]
    return run(
        drafted.tokens[None],  # (1, n)
        tree.positions(target.past_len),  # (1, n): committed length - 1 + depth
        tree.attention_mask(target.past_len),  # (1, 1, n, past + n)
    )[0]

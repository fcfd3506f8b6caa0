"""Growing a token tree with the draft model, best-first, at most one draft call per tree level.

The value of a node is the product of draft probabilities along its path (EAGLE-2). Once the draft has run on a node
(the node is *processed*), the node's ``width`` most likely tokens become its children. Each draft call processes the
``width`` best unprocessed nodes (the frontier) together, under a tree mask. At the end the ``budget`` best nodes
overall form the tree the target verifies; a child's value never exceeds its parent's, so they form a connected tree::

    call 0   draft(pending tokens ... root)                 root processed -> its children
    call 1   draft(frontier, tree mask)                     frontier processed -> their children
    ...      (at most `depth` calls; fewer when stage 2 covers several levels per call, or when the best
             frontier value falls below the shape's threshold: adaptive depth, EAGLE-2's idea)
    keep the `budget` best nodes by value, parents before children (and, with a floor, only those whose value
    reaches it: a wide tree shrinks each step to the nodes likely to be accepted, EAGLE-2's reranking)

Stage 2 (staged decoding): a cheap proposer (the n-gram model) suggests a continuation chain below each frontier
node, and the draft runs the chains in the same call. A chain token that the draft itself would have made a child
(it is among the parent's top ``width``) is a node processed for free, so one call covers several levels. Only the
draft's choices enter the tree; the target's acceptance is unchanged, hence lossless.

The draft's cache holds the committed tokens, then everything the draft ran this step (processed nodes and rejected
chain tokens); ``DraftTree.slots`` says where the kept nodes are, so the accepted path can be kept after acceptance.

Sampled children (speculative sampling, when decoding samples): instead of its top tokens, a processed node's
children are ``width`` independent draws from the draft's distribution q, processed like the target's (temperature,
top-k, top-p); the node keeps q and its draws in order (``SampledChildren``), which acceptance needs (rule B,
``specx.runtime.acceptance``). Which draws a node keeps must not depend on what was drawn, so nothing sampled is
pruned: the frontier shrinks instead, to what the budget still holds; and stage 2 is skipped (its chains are
deterministic proposals).

Two kinds of draft grow trees the same way (``DraftModel``): a decoder over the target's vocabulary (a separate
model, or one derived from the target: ``TokenDraft``), and a trained feature draft (``specx.runtime.feature_draft``)
whose rows also read a state: the target's features in the first call, the parent node's hidden state below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from specx.errors import InvalidArgumentError
from specx.runtime.sampling import SamplingConfig, sample, softmax, target_distribution
from specx.runtime.session import DecoderSession
from specx.runtime.tree import Tree, build_tree, chain

# proposer(context tokens, length) -> up to `length` proposed continuation tokens
Proposer = Callable[[Sequence[int], int], Sequence[int]]


@dataclass(frozen=True)
class TreeShape:
    budget: int  # non-root nodes the target verifies per step
    depth: int  # maximum depth below the root = maximum draft calls per step
    threshold: float = 0.0  # adaptive depth: stop drafting once the best unprocessed path value falls below this
    floor: float = 0.0  # verify only nodes whose path value reaches this (the best node always); top children only

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise InvalidArgumentError(f"tree depth must be >= 1, got {self.depth}")
        if self.budget < self.depth:
            raise InvalidArgumentError(f"tree budget ({self.budget}) must be at least the depth ({self.depth})")
        if not 0.0 <= self.threshold < 1.0:
            raise InvalidArgumentError(f"tree threshold must lie in [0, 1), got {self.threshold}")
        if not 0.0 <= self.floor < 1.0:
            raise InvalidArgumentError(f"tree floor must lie in [0, 1), got {self.floor}")

    @property
    def width(self) -> int:
        """Frontier size and children per processed node: budget == depth gives a chain."""
        return -(-self.budget // self.depth)

    def limited(self, depth: int, nodes: int | None = None) -> "TreeShape":
        """The shape cut to at most ``depth`` levels and ``nodes`` nodes (a one-node chain at least): near the end of
        the context a verify pass of more nodes than positions left would not fit the graph's position tables."""
        nodes = self.budget if nodes is None else nodes
        depth = max(1, min(self.depth, depth, nodes))
        budget = max(depth, min(self.budget, depth * self.width, nodes))
        return TreeShape(budget=budget, depth=depth, threshold=self.threshold, floor=self.floor)


@dataclass(frozen=True)
class DraftSampler:
    """Draw children from the draft's distribution (speculative sampling) rather than take its top tokens."""

    config: SamplingConfig  # the decode's: the draft's logits are processed as the target's are
    rng: np.random.Generator


@dataclass(frozen=True)
class SampledChildren:
    """A node whose children the draft drew: its distribution and its draws in draw order."""

    q: np.ndarray  # (draft vocabulary,) float64
    draws: tuple[int, ...]  # the child node of each draw (a token drawn twice names the same child)
    vocab_map: np.ndarray | None = None  # draft vocabulary id -> target token id; None: the same vocabulary

    def on_target_vocab(self, size: int) -> np.ndarray:
        """q over the target's vocabulary, shape (size,): zero where the draft cannot propose."""
        full = np.zeros(size, dtype=np.float64)
        if self.vocab_map is None:
            n = min(size, self.q.size)
            full[:n] = self.q[:n]
        else:
            full[self.vocab_map] = self.q
        return full


@dataclass(frozen=True)
class DraftTree:
    tokens: np.ndarray  # (n,) int64, node 0 = root
    tree: Tree
    slots: dict[int, int]  # node -> absolute position in the draft cache, for nodes the draft processed
    sampled: dict[int, SampledChildren] = field(default_factory=dict)  # nodes whose children were drawn


@dataclass(frozen=True)
class DraftPass:
    logits: np.ndarray | None  # (rows, draft vocabulary); None when the graph gave its top tokens instead
    hidden: np.ndarray | None = None  # (rows, hidden): a feature draft's states, read by the rows below
    top: tuple[np.ndarray, np.ndarray] | None = None  # (rows, k) draft ids and probabilities, most likely first


def draft_pass(session: DecoderSession, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, top: int,
               extra: dict[str, np.ndarray] | None = None) -> DraftPass:
    """One draft pass. ``top`` > 0: only the ``top`` most likely tokens per row are needed (children by rule A):
    where the graph computes at least that many (``top_tokens``), only those leave it; otherwise the logits."""
    if 0 < top <= session.contract.top_k:
        ids, probs = session.forward_top(tokens, positions, mask, extra)
        return DraftPass(None, top=(ids[0], probs[0]))  # (rows, k) each
    return DraftPass(session.forward(tokens, positions, mask, extra)[0])


class DraftModel(Protocol):
    session: DecoderSession
    vocab_map: np.ndarray | None  # draft vocabulary id -> target token id; None: the same vocabulary

    def first(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, top: int = 0) -> DraftPass:
        """The step's first call: committed tokens the draft has not seen, ending with the root. ``top`` > 0: the
        children come from that many top tokens (``draft_pass``)."""

    def level(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
              states: np.ndarray | None, top: int = 0) -> DraftPass:
        """A tree level: ``states`` (rows, hidden) = each row's parent's hidden state (feature drafts)."""


class TokenDraft:
    """A draft decoder over the target's vocabulary: it reads tokens only."""

    vocab_map = None

    def __init__(self, session: DecoderSession):
        self.session = session

    def first(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, top: int = 0) -> DraftPass:
        return draft_pass(self.session, tokens, positions, mask, top)

    def level(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
              states: np.ndarray | None, top: int = 0) -> DraftPass:
        return self.first(tokens, positions, mask, top)  # no states to read: every call is the same pass


@dataclass
class StageTwoLog:
    proposed: int = 0  # tokens the proposer suggested
    accepted: int = 0  # of those, tokens the draft kept (nodes processed without a call of their own)


@dataclass
class _Growth:
    """Mutable state of one tree's growth; nodes are appended in creation order (parents first)."""

    shape: TreeShape
    root_pos: int
    committed: int  # draft cache positions [0, committed) hold the committed tokens
    vocab_map: np.ndarray | None = None  # draft id -> target id
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    slots: dict[int, int] = field(default_factory=dict)  # processed node -> draft cache position
    children: dict[int, dict[int, int]] = field(default_factory=dict)  # processed node -> {token: child}
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # processed node -> its hidden state (feature drafts)
    sampler: DraftSampler | None = None  # children drawn from the draft (None: its top tokens)
    drawn: dict[int, tuple[np.ndarray, list[int]]] = field(default_factory=dict)  # node -> (q, child per draw)

    def add(self, token: int, parent: int, value: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
        self.values.append(value)
        return len(self.tokens) - 1

    def process(self, node: int, slot: int, out: DraftPass, row: int) -> None:
        """The draft ran on ``node`` (row ``row`` of pass ``out``): record where, and create its children from its
        top tokens."""
        self.slots[node] = slot
        self.children[node] = {}
        if out.hidden is not None:
            self.hidden[node] = out.hidden[row]
        if self.depths[node] >= self.shape.depth:
            return
        if self.sampler is not None:
            self._draw_children(node, out.logits[row])
            return
        if out.top is not None:  # the graph's own top tokens, most likely first
            ids, probs = out.top
            for index, prob in zip(ids[row, : self.shape.width], probs[row, : self.shape.width]):
                self._child(node, int(index), float(prob))
            return
        probs = softmax(out.logits[row].astype(np.float64))
        for index in _top(probs, self.shape.width):
            self._child(node, int(index), float(probs[index]))

    def _draw_children(self, node: int, logits: np.ndarray) -> None:
        """``width`` independent draws from the draft's processed distribution q; each distinct token one child."""
        q = target_distribution(logits, self.sampler.config)  # (draft vocabulary,) float64
        draws = []
        for _ in range(self.shape.width):
            index = sample(q, self.sampler.rng)
            draws.append(self._child(node, index, float(q[index])))
        self.drawn[node] = (q, draws)

    def _child(self, node: int, index: int, prob: float) -> int:
        """The child of ``node`` for draft id ``index`` (created on first sight)."""
        token = index if self.vocab_map is None else int(self.vocab_map[index])
        child = self.children[node].get(token)
        if child is None:
            child = self.children[node][token] = self.add(token, node, self.values[node] * prob)
        return child

    def parent_state(self, node: int) -> np.ndarray | None:
        return self.hidden.get(self.parents[node])

    def path_tokens(self, node: int) -> list[int]:
        out = []
        while node > 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def ancestor_slots(self, node: int) -> list[int]:
        out = []
        node = self.parents[node]
        while node > 0:
            out.append(self.slots[node])
            node = self.parents[node]
        return out

    def frontier(self) -> list[int]:
        open_nodes = [n for n in range(1, len(self.tokens)) if n not in self.slots and self.depths[n] < self.shape.depth]
        count = self.shape.width
        if self.sampler is not None:  # drawn children are never pruned: expand only what the budget holds
            count = min(count, (self.shape.budget - (len(self.tokens) - 1)) // self.shape.width)
        return sorted(open_nodes, key=lambda n: (-self.values[n], n))[: max(count, 0)]


def _top(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities, largest first."""
    k = min(k, probs.size)
    idx = np.argpartition(probs, -k)[-k:]
    return idx[np.argsort(-probs[idx], kind="stable")]


def grow_tree(model: DraftModel, pending: np.ndarray, shape: TreeShape, proposer: Proposer | None = None,
              context: Sequence[int] = (), stage_two: StageTwoLog | None = None,
              sampler: DraftSampler | None = None, max_rows: int | None = None) -> DraftTree:
    """Build the step's token tree.

    ``pending`` = committed tokens the draft has not seen yet, ending with the root; ``context`` = all committed
    tokens (what the proposer conditions on). With a ``proposer``, the draft checks proposed chains (stage 2).
    With a ``sampler``, children are drawn from the draft (and stage 2 is skipped). ``max_rows``: the draft's cache
    rows a pass may reach (its context): near the end of it, a level's chains and then its frontier are cut to fit,
    and growth stops when nothing fits (a smaller tree only proposes less; the output is unchanged).
    """
    if sampler is not None:
        proposer = None
    draft = model.session
    root_pos = draft.past_len + pending.size - 1
    run = chain(pending.size)
    top = shape.width if sampler is None else 0  # children by rule A need only the top tokens
    out = model.first(pending[None], run.positions(draft.past_len), run.attention_mask(draft.past_len), top)
    draft.commit()
    growth = _Growth(shape, root_pos, committed=draft.past_len, vocab_map=model.vocab_map, sampler=sampler)
    growth.add(int(pending[-1]), -1, 1.0)
    growth.process(0, root_pos, out, pending.size - 1)
    for _ in range(1, shape.depth):
        frontier = growth.frontier()
        if not frontier or growth.values[frontier[0]] < shape.threshold:  # adaptive depth: not worth a draft call
            break
        spare = None  # rows left for stage-2 chain tokens once the frontier's own rows are counted
        if max_rows is not None:
            free = max_rows - draft.past_len
            frontier = frontier[: max(free, 0)]  # the best nodes first
            if not frontier:
                break
            spare = free - len(frontier)
        chains = _propose(growth, frontier, proposer, context, stage_two, spare)
        _draft_call(model, growth, frontier, chains, stage_two, top)
    return _select(growth)


def _propose(growth: _Growth, frontier: list[int], proposer: Proposer | None, context: Sequence[int],
             log: StageTwoLog | None, spare: int | None = None) -> list[list[int]]:
    """A proposed chain below each frontier node; ``spare``: chain tokens the draft's cache still holds in all."""
    if proposer is None:
        return [[] for _ in frontier]
    chains = []
    for node in frontier:
        room = growth.shape.depth - growth.depths[node] - 1  # levels below the node that the tree may still use
        if spare is not None:
            room = min(room, spare)
        proposal = list(proposer([*context, *growth.path_tokens(node)], room))[:room] if room > 0 else []
        if spare is not None:
            spare -= len(proposal)
        chains.append(proposal)
        if log is not None:
            log.proposed += len(proposal)
    return chains


def _draft_call(model: DraftModel, growth: _Growth, frontier: list[int], chains: list[list[int]],
                log: StageTwoLog | None, top: int = 0) -> None:
    """One draft call over the frontier nodes and the chains proposed below them.

    A feature draft's row reads its parent's hidden state. A chain token's parent runs in the same call, so its
    state is not known yet: the chain reads the frontier node's parent state instead (an approximation that only
    changes which tokens the draft proposes, never the output)."""
    draft = model.session
    past = draft.past_len
    tokens: list[int] = []
    positions: list[int] = []
    visible: list[list[int]] = []  # per row: cache or in-pass positions it attends to, besides the committed ones
    states: list[np.ndarray | None] = []
    for node, proposal in zip(frontier, chains):
        seen = growth.ancestor_slots(node)
        state = growth.parent_state(node)
        for offset, token in enumerate([growth.tokens[node], *proposal]):
            seen = seen + [past + len(tokens)]  # itself, then visible to the chain tokens after it
            tokens.append(int(token))
            positions.append(growth.root_pos + growth.depths[node] + offset)
            visible.append(seen)
            states.append(state)
    mask = np.zeros((1, 1, len(tokens), past + len(tokens)), dtype=bool)  # (1, 1, rows, past + rows)
    mask[0, 0, :, : growth.committed] = True
    for row, seen in enumerate(visible):
        mask[0, 0, row, seen] = True
    hidden = np.stack(states)[None] if states[0] is not None else None  # (1, rows, hidden)
    out = model.level(np.asarray([tokens], dtype=np.int64), np.asarray([positions], dtype=np.int64), mask, hidden,
                      top)
    draft.commit()
    row = 0
    for node, proposal in zip(frontier, chains):
        growth.process(node, past + row, out, row)
        current = node
        for offset, token in enumerate(proposal, start=1):
            child = growth.children[current].get(int(token))
            if child is None:  # not a token the draft would choose: the rest of the chain is wasted
                break
            growth.process(child, past + row + offset, out, row + offset)
            if log is not None:
                log.accepted += 1
            current = child
        row += 1 + len(proposal)


def _select(growth: _Growth) -> DraftTree:
    n = len(growth.tokens)
    best = sorted(range(1, n), key=lambda i: (-growth.values[i], i))[: growth.shape.budget]
    if growth.sampler is None and growth.shape.floor > 0:  # a child's value never exceeds its parent's: still a tree
        best = [i for i in best if growth.values[i] >= growth.shape.floor] or best[:1]
    keep = sorted(best)
    if growth.sampler is not None and len(keep) != n - 1:
        raise RuntimeError("drawn children must never be pruned")  # frontier() keeps the tree within the budget
    order = [0] + keep  # creation order: parents before children
    index = {old: new for new, old in enumerate(order)}
    tree = build_tree([-1] + [index[growth.parents[i]] for i in keep])
    slots = {index[i]: pos for i, pos in growth.slots.items() if i in index}
    sampled = {index[node]: SampledChildren(q, tuple(index[c] for c in draws), growth.vocab_map)
               for node, (q, draws) in growth.drawn.items()}
    return DraftTree(np.asarray([growth.tokens[i] for i in order], dtype=np.int64), tree, slots, sampled)

"""Growing a token tree with the draft model, best-first, one draft call per tree level.

The value of a node is the product of draft probabilities along its path (EAGLE-2). Each level, every frontier node
proposes its ``width`` most likely children; the ``width`` best new nodes become the next frontier and are run through
the draft together (one call, tree mask). At the end the ``budget`` best nodes overall form the tree the target
verifies: a child's value never exceeds its parent's, so the kept nodes are always a connected tree::

    level 0   draft(pending tokens ... root)            -> children of the root
    level 1   draft(frontier of depth 1, tree mask)     -> children of those
    ...                                                    (depth draft calls in all)
    keep the `budget` best nodes by value, in creation order (parents first)

The draft's cache holds the committed tokens plus the frontier nodes it has processed; ``DraftTree.slots`` says where,
so that after acceptance the accepted path can be kept and the rest dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specx.errors import InvalidArgumentError
from specx.runtime.session import DecoderSession
from specx.runtime.tree import Tree, build_tree, chain


@dataclass(frozen=True)
class TreeShape:
    budget: int  # non-root nodes the target verifies per step
    depth: int  # levels below the root = draft calls per step

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise InvalidArgumentError(f"tree depth must be >= 1, got {self.depth}")
        if self.budget < self.depth:
            raise InvalidArgumentError(f"tree budget ({self.budget}) must be at least the depth ({self.depth})")

    @property
    def width(self) -> int:
        """Frontier size and children per frontier node: budget == depth gives a chain."""
        return -(-self.budget // self.depth)

    def limited(self, depth: int) -> "TreeShape":
        depth = max(1, min(self.depth, depth))
        return TreeShape(budget=max(depth, min(self.budget, depth * self.width)), depth=depth)


@dataclass(frozen=True)
class DraftTree:
    tokens: np.ndarray  # (n,) int64, node 0 = root
    tree: Tree
    slots: dict[int, int]  # node -> absolute position in the draft cache, for nodes the draft processed


def _top(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities, largest first."""
    k = min(k, probs.size)
    idx = np.argpartition(probs, -k)[-k:]
    return idx[np.argsort(-probs[idx], kind="stable")]


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def grow_tree(draft: DecoderSession, pending: np.ndarray, shape: TreeShape) -> DraftTree:
    """Build the step's token tree. ``pending`` = committed tokens the draft has not seen yet, ending with the root."""
    root_pos = draft.past_len + pending.size - 1  # absolute position of the root
    run = chain(pending.size)
    logits = draft.forward(pending[None], run.positions(draft.past_len), run.attention_mask(draft.past_len))
    draft.commit()
    committed = draft.past_len  # the draft cache now holds every committed token, root included

    tokens, parents, depths, values = [int(pending[-1])], [-1], [0], [1.0]
    slots = {0: root_pos}
    frontier, frontier_logits = [0], logits[0, -1:]  # (frontier, vocab)
    for level in range(1, shape.depth + 1):
        probs = _softmax_rows(frontier_logits.astype(np.float64))
        created = []
        for row, node in enumerate(frontier):
            for token in _top(probs[row], shape.width):
                tokens.append(int(token))
                parents.append(node)
                depths.append(level)
                values.append(values[node] * float(probs[row, token]))
                created.append(len(tokens) - 1)
        if level == shape.depth:
            break
        frontier = sorted(created, key=lambda n: -values[n])[: shape.width]
        frontier_logits = _draft_level(draft, frontier, tokens, parents, depths, slots, root_pos, committed)

    keep = sorted(sorted(range(1, len(tokens)), key=lambda n: (-values[n], n))[: shape.budget])
    order = [0] + keep  # creation order: parents before children
    index = {old: new for new, old in enumerate(order)}
    tree = build_tree([-1] + [index[parents[n]] for n in keep])
    new_slots = {index[n]: pos for n, pos in slots.items() if n in index}
    return DraftTree(np.asarray([tokens[n] for n in order], dtype=np.int64), tree, new_slots)


def _draft_level(draft: DecoderSession, frontier: list[int], tokens: list[int], parents: list[int],
                 depths: list[int], slots: dict[int, int], root_pos: int, committed: int) -> np.ndarray:
    """One draft call over a frontier; its nodes see the committed cache, their processed ancestors and themselves."""
    past, k = draft.past_len, len(frontier)
    mask = np.zeros((1, 1, k, past + k), dtype=bool)  # (1, 1, frontier, past + frontier)
    mask[0, 0, :, :committed] = True
    for row, node in enumerate(frontier):
        ancestor = parents[node]
        while ancestor > 0:
            mask[0, 0, row, slots[ancestor]] = True
            ancestor = parents[ancestor]
        mask[0, 0, row, past + row] = True
    positions = np.asarray([[root_pos + depths[n] for n in frontier]], dtype=np.int64)
    logits = draft.forward(np.asarray([[tokens[n] for n in frontier]], dtype=np.int64), positions, mask)
    draft.commit()
    for row, node in enumerate(frontier):
        slots[node] = past + row
    return logits[0]  # (frontier, vocab)

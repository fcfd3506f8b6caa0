"""Lossless acceptance over a token tree (rule A, deterministic children).

At each node, draw the next token exactly as plain decoding would, from the target's processed distribution (one
draw per node; greedy is the argmax). If the token is one of the node's children, the child is accepted and the walk
descends; otherwise the token is emitted (the residual, or the bonus at a leaf) and the step ends. Each emitted token is
therefore distributed exactly as in plain decoding, whatever the tree: output unchanged, and with the same seed the
same draws as the autoregressive loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specx.runtime.sampling import SamplingConfig, choose_token
from specx.runtime.tree import Tree


@dataclass(frozen=True)
class Acceptance:
    path: tuple[int, ...]  # accepted non-root nodes, root to leaf
    next_token: int  # the token drawn where the walk stopped (residual or bonus)


def accept(tree: Tree, tokens: np.ndarray, logits: np.ndarray, sampling: SamplingConfig,
           rng: np.random.Generator) -> Acceptance:
    """Walk the tree from the root; ``logits`` is the target's (n, vocab) output for the tree's nodes."""
    path: list[int] = []
    node = 0
    while True:
        token = choose_token(logits[node], sampling, rng)
        children = tree.children(node)
        match = children[tokens[children] == token]
        if match.size == 0:
            return Acceptance(tuple(path), token)
        node = int(match[0])
        path.append(node)

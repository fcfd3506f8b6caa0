"""Lossless acceptance over a token tree.

Rule A (deterministic children: the draft's top tokens, n-gram proposals). At each node, draw the next token exactly
as plain decoding would, from the target's processed distribution p (one draw per node; greedy is the argmax). If
the token is one of the node's children, the child is accepted and the walk descends; otherwise the token is emitted
(the residual, or the bonus at a leaf) and the step ends. With the same seed, the same draws as the autoregressive
loop.

Rule B (children drawn from the draft's distribution q: speculative sampling, SpecInfer's multi-round form). Take the
node's draws in order; accept draw x with probability min(1, p(x) / q(x)); on rejection replace p by the residual
max(p - q, 0), renormalised, and try the next draw; if every draw is rejected, emit a token drawn from what is left
of p. Each round emits x with probability min(p, q)(x) and passes on the rest, so the emitted token follows p
exactly. A draw repeated after its rejection is rejected again (rejection needs p(x) < q(x), so the residual holds
no x): it only updates p.

Either way each emitted token is distributed exactly as in plain decoding, whatever the tree: output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specx.runtime.drafting import SampledChildren
from specx.runtime.sampling import SamplingConfig, choose_token, sample, target_distribution
from specx.runtime.tree import Tree


@dataclass(frozen=True)
class Acceptance:
    path: tuple[int, ...]  # accepted non-root nodes, root to leaf
    next_token: int  # the token drawn where the walk stopped (residual or bonus)


def accept(tree: Tree, tokens: np.ndarray, logits: np.ndarray, sampling: SamplingConfig,
           rng: np.random.Generator, sampled: dict[int, SampledChildren] | None = None) -> Acceptance:
    """Walk the tree from the root; ``logits`` is the target's (n, vocab) output for the tree's nodes;
    ``sampled`` = the nodes whose children the draft drew (rule B), the others follow rule A."""
    path: list[int] = []
    node = 0
    while True:
        drawn = sampled.get(node) if sampled else None
        if drawn is None:
            token = choose_token(logits[node], sampling, rng)
            children = tree.children(node)
            match = children[tokens[children] == token]
            child = int(match[0]) if match.size else -1
        else:
            child, token = speculative_sample(drawn, tokens, target_distribution(logits[node], sampling), rng)
        if child < 0:
            return Acceptance(tuple(path), token)
        node = child
        path.append(node)


def accept_greedy(tree: Tree, tokens: np.ndarray, argmaxes: np.ndarray) -> Acceptance:
    """Rule A for greedy decoding from each node's argmax (n,) alone (the graph's ``next_tokens``): the same walk
    as ``accept`` with greedy sampling."""
    path: list[int] = []
    node = 0
    while True:
        token = int(argmaxes[node])
        children = tree.children(node)
        match = children[tokens[children] == token]
        if not match.size:
            return Acceptance(tuple(path), token)
        node = int(match[0])
        path.append(node)


def speculative_sample(drawn: SampledChildren, tokens: np.ndarray, p: np.ndarray,
                       rng: np.random.Generator) -> tuple[int, int]:
    """Rule B at one node: (accepted child, its token), or (-1, the token emitted instead). ``p`` (vocab,) float64."""
    q = drawn.on_target_vocab(p.size)  # (vocab,) float64
    rejected: set[int] = set()
    for child in drawn.draws:
        token = int(tokens[child])  # a draft token beyond the target's vocabulary (p = 0 there) is rejected
        if child not in rejected and token < p.size and rng.random() * q[token] < p[token]:
            return child, token
        rejected.add(child)
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total > 0.0:  # zero only when p == q up to rounding: keep p
            p = residual / total
    return -1, sample(p, rng)

"""Token-tree maths, pure numpy.

A tree of ``n`` nodes is given by ``parents`` in topological order (``parents[i] < i``; node 0 is the root with
parent -1). Everything the decoder needs follows from it::

    parents  [-1, 0, 0, 1]          0
    depth    [ 0, 1, 1, 2]         / \\
    mask     1 0 0 0               1   2        row i = row of parents[i] OR e_i:
             1 1 0 0               |            node i sees its ancestors and itself
             1 0 1 0               3
             1 1 0 1

A prompt (or any token run) is the chain ``parents = [-1, 0, 1, ...]``, whose mask is causal.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from specx.errors import InvalidArgumentError

CHAIN_CACHE = 128  # chains of distinct lengths kept built
# Verify passes padded to these sizes give a few fixed shapes (each one captured CUDA graph); see padded_pass
TREE_BUCKETS = (1, 8, 16, 32, 64)
# A draft's passes (the first call's unseen tokens, each tree level's frontier) padded to these sizes in its session
# (DecoderSession pad_to_buckets), so that with CUDA graphs every draft call replays a captured graph
DRAFT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Tree:
    parents: np.ndarray  # (n,) int64, -1 for the root
    depth: np.ndarray  # (n,) int64, 0 for the root
    mask: np.ndarray  # (n, n) bool, ancestors-or-self

    @property
    def size(self) -> int:
        return int(self.parents.shape[0])

    def positions(self, past_len: int) -> np.ndarray:
        """Absolute positions of the nodes when ``past_len`` tokens are already cached. Shape (1, n) int64."""
        return (past_len + self.depth)[None, :]

    def attention_mask(self, past_len: int) -> np.ndarray:
        """The decoder's tree_mask: every node sees the whole cache plus its ancestors and itself.

        Shape (1, 1, n, past_len + n) bool.
        """
        n = self.size
        full = np.ones((1, 1, n, past_len + n), dtype=bool)
        full[0, 0, :, past_len:] = self.mask
        return full

    def path(self, node: int) -> np.ndarray:
        """Node indices from the root to ``node`` inclusive (root first)."""
        return np.flatnonzero(self.mask[node])  # ancestors have smaller indices: topological order is path order

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.parents == node)


def build_tree(parents: np.ndarray | list[int]) -> Tree:
    p = np.asarray(parents, dtype=np.int64)
    if p.ndim != 1 or p.size == 0:
        raise InvalidArgumentError("a token tree needs a non-empty 1-D parents array")
    if p[0] != -1 or np.any(p[1:] < 0) or np.any(p[1:] >= np.arange(1, p.size)):
        raise InvalidArgumentError("parents must be in topological order: parents[0] == -1 and 0 <= parents[i] < i")
    n = p.size
    mask = np.zeros((n, n), dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    mask[0, 0] = True
    for i in range(1, n):
        mask[i] = mask[p[i]]
        mask[i, i] = True
        depth[i] = depth[p[i]] + 1
    for a in (p, depth, mask):
        a.flags.writeable = False
    return Tree(parents=p, depth=depth, mask=mask)


@functools.lru_cache(maxsize=CHAIN_CACHE)
def chain(n: int) -> Tree:
    """A straight run of ``n`` tokens (a prompt, or a draft chain): causal mask, depths 0..n-1. Trees are
    immutable, so the common short chains are built once (one per decode step otherwise)."""
    if n < 1:
        raise InvalidArgumentError("a chain needs at least one token")
    return build_tree(np.arange(-1, n - 1))


def bucket_size(n: int, buckets: tuple[int, ...], room: int) -> int:
    """The smallest bucket that holds ``n`` nodes within ``room`` rows; ``n`` itself where none does."""
    return next((b for b in sorted(buckets) if n <= b <= room), n)


def padded_pass(tree: Tree, tokens: np.ndarray, past_len: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pass's (input_ids (1, size), position_ids (1, size), tree_mask (1, 1, size, past_len + size)) for ``tree``
    padded with ``size - n`` dummy rows after its own (``pad_rows``)."""
    if size < tree.size:
        raise InvalidArgumentError(f"cannot pad a tree of {tree.size} nodes to {size}")
    return pad_rows(tokens[None], tree.positions(past_len), tree.attention_mask(past_len), size)


def pad_rows(input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
             size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pass (input_ids, position_ids (batch, n); tree_mask (batch, 1, n, past + n)) padded with ``size - n`` dummy
    rows after its own. A dummy row repeats the first row's token and position and sees the cache and itself only;
    no real row sees it, so the real rows' outputs and KV are exactly the unpadded pass's, and the dummies' rows
    (never committed) are overwritten like any rejected node's."""
    batch, n = input_ids.shape
    past = tree_mask.shape[3] - n
    ids = np.repeat(input_ids[:, :1], size, axis=1)  # (batch, size)
    ids[:, :n] = input_ids
    positions = np.repeat(position_ids[:, :1], size, axis=1)
    positions[:, :n] = position_ids
    mask = np.zeros((batch, 1, size, past + size), dtype=bool)  # (batch, 1, size, past + size)
    mask[:, :, :, :past] = True
    mask[:, :, :n, :past + n] = tree_mask
    pads = np.arange(n, size)
    mask[:, :, pads, past + pads] = True
    return ids, positions, mask

"""Rule B (children drawn from the draft): the emitted token follows the target's distribution exactly."""

import numpy as np
import pytest

from specx.runtime.acceptance import accept, speculative_sample
from specx.runtime.drafting import SampledChildren
from specx.runtime.sampling import SamplingConfig
from specx.runtime.tree import build_tree

DRAWS = 60_000
P = np.array([0.05, 0.40, 0.25, 0.20, 0.10])  # target
Q = np.array([0.30, 0.10, 0.45, 0.05, 0.10])  # draft: far from P on purpose


def _node(draws: list[int], q: np.ndarray = Q) -> tuple[SampledChildren, np.ndarray]:
    """A root whose children are the distinct ``draws``: (its SampledChildren, the tree's tokens)."""
    unique = list(dict.fromkeys(draws))
    tokens = np.asarray([0, *unique])  # node 0 = the root (its token does not matter here)
    return SampledChildren(q, tuple(1 + unique.index(t) for t in draws)), tokens


@pytest.mark.parametrize("width", [1, 2, 3])
def test_rule_b_emits_the_target_distribution(width):
    """Over the draft's draws (iid from Q, repeats included) and the acceptance's, the emitted token ~ P."""
    rng = np.random.default_rng(width)
    counts = np.zeros(P.size)
    for _ in range(DRAWS):
        drawn, tokens = _node([int(t) for t in rng.choice(P.size, size=width, p=Q)])
        _, token = speculative_sample(drawn, tokens, P, rng)
        counts[token] += 1
    np.testing.assert_allclose(counts / DRAWS, P, atol=0.01)  # 4+ standard deviations


def test_rule_b_accepts_more_than_rule_a_when_the_draft_is_right():
    """With q == p a drawn child is always accepted; rule A with a fixed top child accepts it with p(child)."""
    rng = np.random.default_rng(0)
    drawn, tokens = _node([int(rng.choice(P.size, p=P))], q=P)
    assert all(speculative_sample(drawn, tokens, P, rng)[0] == 1 for _ in range(1_000))


def test_accept_walks_sampled_nodes_and_bonus_leaves():
    """A chain root -> a -> b with drawn children: the walk descends by rule B and draws the bonus at the leaf;
    greedy target distributions reduce rule B to following the argmax."""
    tree = build_tree([-1, 0, 1])
    tokens = np.asarray([0, 2, 3])
    sampled = {0: SampledChildren(Q, (1,)), 1: SampledChildren(Q, (2,))}
    logits = np.full((3, P.size), -10.0, dtype=np.float32)
    logits[0, 2] = logits[1, 3] = logits[2, 4] = 10.0  # the target's argmax: 2, then 3, then 4
    result = accept(tree, tokens, logits, SamplingConfig(), np.random.default_rng(0), sampled)
    assert result.path == (1, 2) and result.next_token == 4
    logits[1, 3], logits[1, 1] = -10.0, 10.0  # now the target wants 1 after 2: the drawn 3 is rejected
    result = accept(tree, tokens, logits, SamplingConfig(), np.random.default_rng(0), sampled)
    assert result.path == (1,) and result.next_token == 1

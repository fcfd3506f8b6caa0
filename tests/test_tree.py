import numpy as np
import pytest

from specx.errors import InvalidArgumentError
from specx.runtime.tree import build_tree, chain


def test_hand_written_tree():
    #      0
    #     / \
    #    1   2
    #    |    \
    #    3     4
    #    |
    #    5
    tree = build_tree([-1, 0, 0, 1, 2, 3])
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(tree.mask, expected)
    assert tree.path(5).tolist() == [0, 1, 3, 5]
    assert tree.path(4).tolist() == [0, 2, 4]
    assert tree.children(0).tolist() == [1, 2]
    assert tree.positions(10).tolist() == [[10, 11, 11, 12, 12, 13]]


def test_attention_mask_sees_whole_past():
    tree = build_tree([-1, 0, 0])
    mask = tree.attention_mask(past_len=4)
    assert mask.shape == (1, 1, 3, 7)
    assert mask[0, 0, :, :4].all()
    np.testing.assert_array_equal(mask[0, 0, :, 4:], tree.mask)


def test_chain_is_causal():
    run = chain(4)
    np.testing.assert_array_equal(run.mask, np.tril(np.ones((4, 4), dtype=bool)))
    assert run.positions(0).tolist() == [[0, 1, 2, 3]]


def test_results_are_frozen():
    tree = build_tree([-1, 0])
    with pytest.raises(ValueError):
        tree.mask[0, 1] = True


@pytest.mark.parametrize("parents", [[], [0], [-1, 1], [-1, 0, 3, 1], [-1, -1]])
def test_invalid_parents(parents):
    with pytest.raises(InvalidArgumentError):
        build_tree(parents)

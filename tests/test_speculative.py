"""Tree speculative decoding is lossless: greedy equals plain greedy, sampling follows the model's distribution."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from specx.errors import InvalidArgumentError
from specx.runtime import Generator, bench
from specx.runtime.generator import DRAWN_TREE_THRESHOLD, GREEDY_TREE_THRESHOLD, SAMPLING_TREE_THRESHOLD
from specx.runtime.decoding import feed
from specx.runtime.drafting import TokenDraft, TreeShape, _Growth, _select, grow_tree
from tests.helpers import assert_first_two_tokens_follow_the_model

PROMPTS = ["def f12(x):", "the quick brown fox", "one two three", "print"]
SHAPES = [(1, 1), (3, 3), (6, 3), (8, 4), (12, 2)]  # (budget, depth); budget == depth is a chain
BUNDLES = ["gpt2_bundle", "llama_self_bundle", "gpt2_same_draft_bundle"]


@pytest.fixture(scope="module")
def generators(request):
    return {name: Generator.load(request.getfixturevalue(name), provider="cpu") for name in BUNDLES}


@pytest.mark.parametrize("bundle,prompt,shape", list(itertools.product(BUNDLES, PROMPTS, SHAPES)))
def test_greedy_equals_autoregressive(generators, bundle, prompt, shape):
    gen = generators[bundle]
    ar = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="autoregressive")
    sp = gen.generate(prompt, max_new_tokens=40, ignore_eos=True, mode="speculative", tree_budget=shape[0],
                      tree_depth=shape[1])
    assert sp.tokens == ar.tokens
    s = sp.stats
    assert s.mode == "speculative" and s.new_tokens == 40
    prefill_calls = 1 if s.prompt_tokens > 1 else 0  # the prompt minus its last token (the first tree's root)
    assert sum(s.accepted_histogram) == s.target_calls - prefill_calls  # every other call verified a tree
    assert s.draft_calls >= shape[1]
    assert s.tokens_per_target_call >= 1.0


def test_the_disagreeing_draft_really_disagrees(generators):
    s = generators["gpt2_bundle"].generate("one two three", max_new_tokens=60, ignore_eos=True,
                                           tree_budget=4, tree_depth=4).stats
    assert s.accepted_histogram[0] > 0 and s.tokens_per_target_call < 4.0


@pytest.mark.parametrize("budget,depth", [(2, 2), (3, 3), (5, 5)])
def test_identical_draft_reaches_depth_plus_one(generators, budget, depth):
    gen = generators["gpt2_same_draft_bundle"]
    steps = 6
    s = gen.generate("one two", max_new_tokens=steps * (depth + 1), ignore_eos=True, mode="speculative",
                     tree_budget=budget, tree_depth=depth, tree_threshold=0.0).stats
    assert s.tokens_per_target_call == depth + 1
    assert s.accepted_histogram == [0] * depth + [steps]


@pytest.mark.parametrize("budget,depth", [(6, 2), (12, 4)])
def test_identical_draft_tree_always_accepts_the_best_child(generators, budget, depth):
    """Best-first trees keep the draft's argmax child of the root, which an identical target always accepts.

    (Deeper acceptance depends on the draft's confidence: these random models are flat, so best-first prefers width.)
    """
    gen = generators["gpt2_same_draft_bundle"]
    s = gen.generate("one two", max_new_tokens=40, ignore_eos=True, tree_budget=budget, tree_depth=depth).stats
    assert s.accepted_histogram[0] == 0 and s.tokens_per_target_call >= 2


def test_weight_bytes_ratio(generators):
    gen = generators["gpt2_same_draft_bundle"]
    s = gen.generate("one two", max_new_tokens=20, ignore_eos=True, tree_budget=4, tree_depth=4).stats
    w = gen.bundle.manifest.target.weight_bytes
    expected = (s.target_calls * w + s.draft_calls * gen.bundle.manifest.draft.weight_bytes) / (s.new_tokens * w)
    assert s.weight_bytes_ratio == pytest.approx(expected)
    ar = gen.generate("one two", max_new_tokens=20, ignore_eos=True, mode="autoregressive").stats
    assert ar.weight_bytes_ratio == pytest.approx(1.0)


def test_draft_calls_per_step_equal_depth(generators):
    gen = generators["gpt2_bundle"]
    s = gen.generate("one two", max_new_tokens=30, ignore_eos=True, tree_budget=9, tree_depth=3,
                     tree_threshold=0.0).stats
    steps = sum(s.accepted_histogram)
    # one draft call per level; in the last steps the tree is cut to the tokens still wanted, never deeper
    assert (steps - 3) * 3 <= s.draft_calls <= steps * 3


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
def test_adaptive_depth_drafts_less_and_stays_exact(generators, threshold):
    gen = generators["gpt2_bundle"]
    for prompt in PROMPTS:
        fixed = gen.generate(prompt, max_new_tokens=30, ignore_eos=True, tree_budget=8, tree_depth=8,
                             tree_threshold=0.0)
        adaptive = gen.generate(prompt, max_new_tokens=30, ignore_eos=True, tree_budget=8, tree_depth=8,
                                tree_threshold=threshold)
        assert adaptive.tokens == fixed.tokens
        assert adaptive.stats.draft_calls / adaptive.stats.target_calls < fixed.stats.draft_calls / fixed.stats.target_calls
        assert adaptive.stats.tree_threshold == threshold and adaptive.stats.draft_calls_saved > 0


def test_auto_mode_follows_what_was_measured(generators):
    derived, separate = generators["llama_self_bundle"], generators["gpt2_bundle"]
    assert derived.generate("one", max_new_tokens=3).stats.mode == "staged"
    for gen in (derived, separate):  # sampling: drawn children from any draft model
        stats = gen.generate("one", max_new_tokens=3, temperature=1.0, seed=0).stats
        assert (stats.mode, stats.draft_choice) == ("speculative", "sample")


def test_default_threshold_depends_on_sampling(generators):
    gen = generators["gpt2_bundle"]
    assert gen.generate("one", max_new_tokens=3).stats.tree_threshold == GREEDY_TREE_THRESHOLD
    assert gen.generate("one", max_new_tokens=3, temperature=1.0, seed=0).stats.tree_threshold == DRAWN_TREE_THRESHOLD
    top = gen.generate("one", max_new_tokens=3, temperature=1.0, seed=0, draft_choice="top").stats
    assert top.tree_threshold == SAMPLING_TREE_THRESHOLD
    with pytest.raises(InvalidArgumentError, match="threshold"):
        gen.generate("one", max_new_tokens=3, tree_threshold=1.5)


def test_sampling_same_seed_same_tokens_with_top_children(generators):
    """Rule A draws exactly what plain decoding draws; drawn children (the default) spend draws of their own."""
    gen = generators["gpt2_bundle"]
    for kwargs in (dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.8)):
        ar = gen.generate("one two", max_new_tokens=30, ignore_eos=True, mode="autoregressive", seed=9, **kwargs)
        sp = gen.generate("one two", max_new_tokens=30, ignore_eos=True, mode="speculative", seed=9,
                          draft_choice="top", **kwargs)
        assert sp.tokens == ar.tokens and sp.stats.draft_choice == "top"
        drawn = gen.generate("one two", max_new_tokens=30, ignore_eos=True, mode="speculative", seed=9, **kwargs)
        assert drawn.stats.draft_choice == "sample" and drawn.tokens != ar.tokens
    with pytest.raises(InvalidArgumentError, match="draft choice"):
        gen.generate("one", max_new_tokens=3, temperature=1.0, draft_choice="best")


SAMPLING_CASES = [dict(temperature=1.0), dict(temperature=0.7, top_k=8), dict(temperature=1.0, top_p=0.7)]


@pytest.mark.parametrize("choice", ["sample", "top"])
@pytest.mark.parametrize("kwargs", SAMPLING_CASES)
def test_sampling_matches_the_model_distribution(generators, kwargs, choice):
    assert_first_two_tokens_follow_the_model(generators["gpt2_bundle"], "speculative", 10_000, draft_choice=choice,
                                             **kwargs)


def test_cache_after_speculation_equals_plain_decoding(generators):
    gen = generators["llama_self_bundle"]
    prompt = gen.bundle.tokenizer.encode("one two three").ids
    result = gen.generate(prompt, max_new_tokens=50, ignore_eos=True, tree_budget=8, tree_depth=4,
                          temperature=1.0, seed=3, mode="speculative")
    assert result.stats.accepted_histogram[0] > 0  # there were rejections
    sequence = np.asarray(prompt + result.tokens, dtype=np.int64)
    for session in (gen.target, gen.draft):
        length = min(session.past_len, sequence.size)
        ours = [a[:, :, :length] for a in session.cache_arrays()]
        session.reset()
        feed(session, sequence[:length])
        for a, b in zip(ours, session.cache_arrays()):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_tree_growth_calls_draft_once_per_level(generators):
    gen = generators["gpt2_bundle"]
    draft = gen.draft
    draft.reset()
    draft.reset_counters()
    drafted = grow_tree(TokenDraft(draft), np.asarray(gen.bundle.tokenizer.encode("one two").ids, dtype=np.int64),
                        TreeShape(budget=10, depth=4))
    assert draft.calls == 4
    assert drafted.tree.size == 11 and int(drafted.tree.depth.max()) <= 4
    # children come from the draft's top choices: the root's first child is the draft's argmax
    assert drafted.tokens[1] == int(np.argmax(feed_logits(gen, "one two")))


def feed_logits(gen: Generator, text: str) -> np.ndarray:
    gen.draft.reset()
    return feed(gen.draft, np.asarray(gen.bundle.tokenizer.encode(text).ids, dtype=np.int64))


@pytest.mark.parametrize("budget,depth", [(2, 3), (0, 0), (4, 0)])
def test_invalid_tree_shapes(generators, budget, depth):
    with pytest.raises(InvalidArgumentError):
        generators["gpt2_bundle"].generate("one", tree_budget=budget, tree_depth=depth)


@pytest.mark.parametrize("floor", [-0.1, 1.0])
def test_invalid_tree_floor(generators, floor):
    with pytest.raises(InvalidArgumentError, match="floor"):
        generators["gpt2_bundle"].generate("one", tree_floor=floor)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_a_tree_floor_verifies_fewer_nodes_and_stays_exact(generators, bundle):
    gen = generators[bundle]
    tree = dict(max_new_tokens=30, ignore_eos=True, mode="speculative", tree_budget=12, tree_depth=4,
                tree_threshold=0.0)
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=30, ignore_eos=True, mode="autoregressive").tokens
        every = gen.generate(prompt, **tree, tree_floor=0.0).stats
        assert every.tree_floor == 0.0 and every.nodes_per_verify > 10  # 12 a step, fewer in the last steps
        some = gen.generate(prompt, **tree, tree_floor=0.2)
        assert some.tokens == plain and some.stats.tree_floor == 0.2
        assert some.stats.nodes_per_verify < every.nodes_per_verify
        best = gen.generate(prompt, **tree, tree_floor=0.99)  # no node is that likely: the best one only
        assert best.tokens == plain and best.stats.nodes_per_verify == 1.0


def test_the_floor_keeps_the_likely_nodes_as_a_tree():
    growth = _Growth(TreeShape(budget=6, depth=3, floor=0.2), root_pos=0, committed=0)
    growth.add(100, -1, 1.0)
    a, b = growth.add(1, 0, 0.6), growth.add(2, 0, 0.3)  # path values: products of draft probabilities
    growth.add(3, a, 0.45), growth.add(4, a, 0.1), growth.add(5, b, 0.15)
    kept = _select(growth)
    assert kept.tokens.tolist() == [100, 1, 2, 3] and kept.tree.parents.tolist() == [-1, 0, 0, 1]
    growth.shape = TreeShape(budget=6, depth=3, floor=0.9)
    assert _select(growth).tokens.tolist() == [100, 1]  # nothing reaches it: the best node alone
    growth.shape = TreeShape(budget=6, depth=3)
    assert _select(growth).tree.size == 6


def test_drawn_children_ignore_the_floor(generators):
    gen = generators["gpt2_bundle"]
    kwargs = dict(max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=3, mode="speculative",
                  draft_choice="sample", tree_budget=8, tree_depth=4)
    without = gen.generate("one two", **kwargs, tree_floor=0.0)
    floored = gen.generate("one two", **kwargs, tree_floor=0.5)
    assert floored.tokens == without.tokens  # same draws, same trees: nothing drawn is ever dropped
    assert floored.stats.nodes_per_verify == without.stats.nodes_per_verify and floored.stats.tree_floor == 0.0


def test_tuning_tries_floors_only_where_they_act():
    greedy = bench.candidates(["speculative", "ngram"], sampling=False)
    floored = [c for c in greedy if c.tree_floor > 0]
    assert floored and all(c.mode == "speculative" and c.tree_budget > c.tree_depth for c in floored)
    assert not any(c.tree_floor for c in bench.candidates(["speculative"], sampling=True))


def test_derived_draft_is_recorded(llama_self_bundle):
    manifest = json.loads((llama_self_bundle / "manifest.json").read_text())
    assert manifest["draft"]["derived_from"] == "self:layers=1,int8"
    assert manifest["draft"]["weight_bytes"] < manifest["target"]["weight_bytes"]


def test_a_sampling_tuning_keeps_the_proposals_it_was_measured_with(generators, monkeypatch):
    """A tuning recorded before drawn proposals existed (no draft_choice) measured top proposals: auto keeps them."""
    gen = generators["gpt2_bundle"]
    tuned = {"mode": "speculative", "tree_budget": 4, "tree_depth": 4, "tree_threshold": 0.5}
    for record, expected in ((tuned, "top"), ({**tuned, "draft_choice": "sample"}, "sample")):
        monkeypatch.setattr(gen, "tuned", lambda sampling, record=record: dict(record) if sampling else {})
        stats = gen.generate("one", max_new_tokens=4, temperature=1.0, seed=0).stats
        assert stats.draft_choice == expected and stats.tree_threshold == 0.5
        assert gen.generate("one", max_new_tokens=4, temperature=1.0, seed=0,
                            draft_choice="sample").stats.draft_choice == "sample"  # an explicit choice wins


def _inexact_copy(bundle, tmp_path):
    """A copy of ``bundle`` whose manifest says its target's tree passes are not exact (as export records for int4 at
    accuracy_level 4 on real models)."""
    import shutil

    copy = tmp_path / "inexact"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["parity"]["row_consistent"] = False
    manifest["target"]["parity"]["chains_exact"] = False  # neither trees nor chains (tests/test_exact_chains.py)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_target_whose_trees_are_not_exact_decodes_plainly(llama_bundle, tmp_path):
    """A target measured at export to compute tree passes unlike one-token steps (int4 at accuracy_level 4 on real
    models): auto decodes plainly and the tree modes refuse, rather than change the output."""
    parity = json.loads((llama_bundle / "manifest.json").read_text())["target"]["parity"]
    assert parity["row_consistent"] is True and parity["tree_vs_steps"] <= 1e-3  # recorded at export
    gen = Generator.load(_inexact_copy(llama_bundle, tmp_path), provider="cpu")
    result = gen.generate("one two", max_new_tokens=8, ignore_eos=True)
    assert result.stats.mode == "autoregressive"
    for mode in ("speculative", "staged", "ngram"):
        with pytest.raises(InvalidArgumentError, match="would change this bundle's output"):
            gen.generate("one two", max_new_tokens=8, mode=mode, ignore_eos=True)


def test_bench_runs_plain_decoding_only_where_trees_are_not_exact(llama_self_bundle, tmp_path):
    gen = Generator.load(_inexact_copy(llama_self_bundle, tmp_path), provider="cpu")
    assert bench.supported_modes(gen) == []
    assert bench.check_modes(gen, ["autoregressive"]) == []
    with pytest.raises(InvalidArgumentError, match="cannot run mode"):
        bench.check_modes(gen, ["speculative"])


def test_tuning_a_bundle_that_decodes_plainly_is_a_clear_error(llama_self_bundle, tmp_path):
    gen = Generator.load(_inexact_copy(llama_self_bundle, tmp_path), provider="cpu")
    prompts = bench.load_prompts(None, 1)
    with pytest.raises(InvalidArgumentError, match="nothing to tune.*not exact"):
        bench.tune(gen, prompts, bench.supported_modes(gen), 0.0, 4)

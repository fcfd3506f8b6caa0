"""GenerationConfig: validated once, overridable per call, filled from the bundle's tuning and the measured defaults;
the CLI builds one from its flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specx.errors import InvalidArgumentError
from specx.runtime import GenerationConfig, Generator, TreeConfig
from specx.runtime.bench import write_tuning
from specx.runtime.config import OVERRIDES, as_config
from specx.runtime.defaults import (DRAWN_TREE_THRESHOLD, FEATURE_GREEDY_TREE, FEATURE_GREEDY_TREE_FLOOR,
                                    FEATURE_GREEDY_TREE_THRESHOLD, GREEDY_TREE_THRESHOLD, SAMPLING_TREE_THRESHOLD,
                                    DraftKind, resolve)
from tests.test_cli import _ok, _user_error

SEPARATE = DraftKind(model=True)
TRAINED = DraftKind(model=True, trained=True)
NO_DRAFT = DraftKind(model=False)
TUNED = {"mode": "speculative", "tree_budget": 12, "tree_depth": 6, "tree_threshold": 0.05, "tree_floor": 0.02,
         "draft_choice": "sample", "speedup": 1.4}


# -- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"ignore_eos": 1}, "ignore_eos must be True or False"),
    ({"mode": "fast"}, "unknown mode 'fast'"),
    ({"tree": {"budget": 8}}, "tree must be a TreeConfig"),
])
def test_a_bad_field_is_one_error_naming_it(fields, match):
    with pytest.raises(InvalidArgumentError, match=match.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        GenerationConfig(**fields)


@pytest.mark.parametrize("fields,match", [
    ({"budget": "8"}, "tree_budget must be an integer"),
    ({"depth": 0}, "tree depth must be >= 1"),
    ({"budget": 2, "depth": 4}, "tree budget (2) must be at least the depth (4)"),
    ({"budget": 3}, "tree budget (3) must be at least the depth (5)"),  # half a shape: the default depth
    ({"threshold": 1.0}, "tree threshold must lie in [0, 1)"),
    ({"floor": float("nan")}, "tree_floor must be a finite number"),
    ({"draft_choice": "best"}, "unknown draft choice 'best'"),
])
def test_a_bad_tree_is_one_error_naming_it(fields, match):
    with pytest.raises(InvalidArgumentError) as error:
        TreeConfig(**fields)
    assert match in str(error.value)


def test_values_are_normalised_once():
    import numpy as np

    config = GenerationConfig(max_new_tokens=np.int64(4), temperature=1, tree=TreeConfig(budget=np.int32(6)))
    assert type(config.max_new_tokens) is int and type(config.temperature) is float
    assert type(config.tree.budget) is int
    assert config.sampling.temperature == 1.0 and not config.sampling.greedy


# -- overrides ------------------------------------------------------------------------------------------------------
def test_overrides_use_the_flat_names_and_reach_the_tree():
    base = GenerationConfig(max_new_tokens=16, tree=TreeConfig(budget=8, depth=4))
    changed = base.replace(temperature=0.7, tree_budget=12, tree_floor=0.1, draft_choice="top")
    assert changed == GenerationConfig(max_new_tokens=16, temperature=0.7,
                                       tree=TreeConfig(budget=12, depth=4, floor=0.1, draft_choice="top"))
    assert base.tree.budget == 8  # frozen: the original is unchanged
    assert base.replace(tree=TreeConfig(depth=3)).tree == TreeConfig(depth=3)
    assert set(base.to_overrides()) == set(OVERRIDES) - {"tree"}
    assert GenerationConfig().replace(**changed.to_overrides()) == changed


def test_unknown_overrides_are_named():
    with pytest.raises(InvalidArgumentError, match="unknown generation option.* max_tokens, tree_width"):
        GenerationConfig().replace(max_tokens=3, tree_width=2)


def test_a_bad_override_is_validated_like_a_field():
    with pytest.raises(InvalidArgumentError, match="tree budget \\(2\\) must be at least the depth \\(4\\)"):
        GenerationConfig(tree=TreeConfig(depth=4)).replace(tree_budget=2)


def test_only_a_generation_config_is_a_config():
    assert as_config(None, {"seed": 1}) == GenerationConfig(seed=1)
    with pytest.raises(InvalidArgumentError, match="config must be a GenerationConfig.*by keyword"):
        as_config(64, {})


# -- the bundle's defaults (pure: no bundle needed) --------------------------------------------------------------
def test_the_measured_defaults_fill_what_is_unset():
    greedy = resolve(GenerationConfig(), SEPARATE, None)
    assert greedy.mode == "staged" and (greedy.tree.budget, greedy.tree.depth) == (5, 5)
    assert greedy.tree.threshold == GREEDY_TREE_THRESHOLD and greedy.tree.floor == 0.0
    trained = resolve(GenerationConfig(), TRAINED, None)
    assert trained.mode == "speculative" and (trained.tree.budget, trained.tree.depth) == FEATURE_GREEDY_TREE
    assert trained.tree.threshold == FEATURE_GREEDY_TREE_THRESHOLD
    assert trained.tree.floor == FEATURE_GREEDY_TREE_FLOOR
    drawn = resolve(GenerationConfig(temperature=1.0), SEPARATE, None)
    assert drawn.mode == "speculative" and drawn.tree.draft_choice == "sample" and drawn.draws_children
    assert drawn.tree.threshold == DRAWN_TREE_THRESHOLD
    top = resolve(GenerationConfig(temperature=1.0, tree=TreeConfig(draft_choice="top")), SEPARATE, None)
    assert top.tree.threshold == SAMPLING_TREE_THRESHOLD and not top.draws_children
    assert resolve(GenerationConfig(), NO_DRAFT, None).mode == "ngram"
    assert resolve(GenerationConfig(temperature=1.0), NO_DRAFT, None).mode == "autoregressive"


def test_the_tuning_record_fills_what_is_unset_and_the_caller_wins():
    tuned = resolve(GenerationConfig(temperature=0.8), SEPARATE, TUNED)
    assert tuned.mode == "speculative" and tuned.tree == TreeConfig(12, 6, 0.05, 0.0, "sample")  # drawn: no floor
    greedy = resolve(GenerationConfig(), SEPARATE, {**TUNED, "draft_choice": "top"})
    assert greedy.tree == TreeConfig(12, 6, 0.05, 0.02, "auto")  # greedy: the draft choice does not matter
    asked = resolve(GenerationConfig(mode="staged", tree=TreeConfig(budget=8, depth=4)), SEPARATE, TUNED)
    assert asked.mode == "staged" and (asked.tree.budget, asked.tree.depth) == (8, 4)
    assert asked.tree.floor == 0.0 and asked.tree.threshold == 0.05  # the tuned floor comes with the tuned shape only
    old = resolve(GenerationConfig(temperature=1.0), SEPARATE, {"mode": "speculative"})  # before drawn children
    assert old.tree.draft_choice == "top" and old.tree.threshold == SAMPLING_TREE_THRESHOLD


def test_a_resolved_config_resolves_to_itself():
    for config, draft in ((GenerationConfig(), TRAINED), (GenerationConfig(temperature=0.5), SEPARATE),
                          (GenerationConfig(mode="ngram"), NO_DRAFT)):
        once = resolve(config, draft, TUNED)
        assert resolve(once, draft, TUNED) == once


def test_a_drafting_mode_needs_a_draft():
    with pytest.raises(InvalidArgumentError, match="needs a bundle with a draft model"):
        resolve(GenerationConfig(mode="speculative"), NO_DRAFT, None)


# -- the Generator ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory: pytest.TempPathFactory, gpt2_bundle: Path) -> Path:
    path = tmp_path_factory.mktemp("tuned") / "bundle"
    shutil.copytree(gpt2_bundle, path)
    write_tuning(path, {"greedy": {"mode": "speculative", "tree_budget": 6, "tree_depth": 3, "tree_threshold": 0.0,
                                   "tree_floor": 0.0, "speedup": 1.2}})
    return path


def test_the_bundle_tuning_feeds_the_config(tuned_bundle: Path):
    gen = Generator.load(tuned_bundle, provider="cpu")
    config = gen.default_config()
    assert config.mode == "speculative" and (config.tree.budget, config.tree.depth, config.tree.threshold) == (6, 3, 0)
    result = gen.generate("one two", max_new_tokens=12, ignore_eos=True)
    assert result.config == config.replace(max_new_tokens=12, ignore_eos=True)
    assert (result.stats.mode, result.stats.tree_budget, result.stats.tree_depth) == ("speculative", 6, 3)
    again = gen.generate("one two", config, max_new_tokens=12, ignore_eos=True)  # the resolved config, passed back
    assert again.tokens == result.tokens and again.config == result.config
    per_call = gen.generate("one two", config, max_new_tokens=12, ignore_eos=True, mode="staged", tree_budget=8)
    assert (per_call.stats.mode, per_call.stats.tree_budget, per_call.stats.tree_depth) == ("staged", 8, 3)
    assert per_call.tokens == result.tokens  # greedy: every mode and tree decodes the same tokens
    assert gen.default_config(temperature=1.0).mode == "speculative"  # no sampling record: the measured default


def test_keywords_and_a_config_are_the_same_call(gpt2_bundle: Path):
    gen = Generator.load(gpt2_bundle, provider="cpu")
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, seed=5, ignore_eos=True,
                              tree=TreeConfig(budget=6, depth=3))
    by_config = gen.generate("one two", config)
    by_keywords = gen.generate("one two", max_new_tokens=10, temperature=0.9, top_k=20, seed=5, ignore_eos=True,
                               tree_budget=6, tree_depth=3)
    assert by_config.tokens == by_keywords.tokens and by_config.config == by_keywords.config
    streamed = gen.stream("one two", config)
    for _ in streamed:
        pass
    assert streamed.result.tokens == by_config.tokens and streamed.result.config == by_config.config


def test_unknown_keywords_are_refused_before_anything_runs(gpt2_bundle: Path):
    gen = Generator.load(gpt2_bundle, provider="cpu")
    with pytest.raises(InvalidArgumentError, match="unknown generation option.* max_tokens"):
        gen.generate("one two", max_tokens=3)
    with pytest.raises(InvalidArgumentError, match="unknown generation option.* temprature"):
        gen.stream("one two", temprature=0.5)
    with pytest.raises(InvalidArgumentError, match="config must be a GenerationConfig"):
        gen.generate("one two", 16)  # the old positional max_new_tokens
    assert gen.target.calls == 0


# -- the CLI ----------------------------------------------------------------------------------------------------------
def test_run_flags_map_to_the_config(gpt2_bundle: Path, monkeypatch):
    asked = []
    resolve_config = Generator.default_config

    def recording(self, config=None, **overrides):
        asked.append(config)
        return resolve_config(self, config, **overrides)

    monkeypatch.setattr(Generator, "default_config", recording)
    out = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "6",
                          "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--seed", "3", "--ignore-eos",
                          "--mode", "speculative", "--tree-budget", "6", "--tree-depth", "3", "--tree-threshold",
                          "0.2", "--tree-floor", "0.1", "--draft-choice", "top", "--json"]).stdout)
    assert asked == [GenerationConfig(max_new_tokens=6, temperature=0.5, top_k=7, top_p=0.9, seed=3, ignore_eos=True,
                                      mode="speculative", tree=TreeConfig(6, 3, 0.2, 0.1, "top"))]
    stats = out["stats"]
    assert (stats["tree_budget"], stats["tree_depth"], stats["tree_threshold"], stats["tree_floor"]) == (6, 3, 0.2, 0.1)
    assert stats["draft_choice"] == "top" and stats["new_tokens"] == 6


def test_bench_flags_map_to_the_config(gpt2_bundle: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    _ok(["bench", str(gpt2_bundle), "--limit", "1", "--temperatures", "0", "--modes", "speculative",
         "--max-new-tokens", "4", "--tree-budget", "6", "--tree-depth", "3", "--json", str(out)])
    meta = json.loads(out.read_text())["meta"]
    assert meta["max_new_tokens"] == 4 and meta["tree"] == {"tree_budget": 6, "tree_depth": 3}
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"autoregressive", "speculative"}


def test_cli_config_errors_are_one_line(gpt2_bundle: Path):
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]")
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", "--tree-depth", "0"], "tree depth must be >= 1")
    _user_error(["bench", str(gpt2_bundle), "--tree-budget", "2", "--tree-depth", "4"], "tree budget (2)")


CHAINS_ONLY = DraftKind(model=True, trained=True, exact_trees=False)


def test_an_untuned_chains_only_bundle_runs_one_token_chains():
    """int8-activation targets (chains only): greedy n-gram 1-chains whatever the draft (measured best: 1.23x
    against the trained draft's 1.07x and its 4-chain's 0.86x); sampling decodes plainly (drawn 1-chains 0.98x)."""
    from specx.runtime.defaults import CHAINS_ONLY_DEPTH

    resolved = resolve(GenerationConfig(), CHAINS_ONLY, None)
    assert resolved.mode == "ngram" and (resolved.tree.budget, resolved.tree.depth) == (CHAINS_ONLY_DEPTH,) * 2
    assert resolve(GenerationConfig(temperature=1.0), CHAINS_ONLY, None).mode == "autoregressive"
    drawn = resolve(GenerationConfig(temperature=1.0, mode="speculative"), CHAINS_ONLY, None)
    assert (drawn.tree.budget, drawn.tree.depth) == (CHAINS_ONLY_DEPTH,) * 2 and drawn.tree.draft_choice == "sample"
    asked = resolve(GenerationConfig(tree=TreeConfig(depth=3, budget=3)), CHAINS_ONLY, None)
    assert (asked.tree.budget, asked.tree.depth) == (3, 3)
    tuned = resolve(GenerationConfig(), CHAINS_ONLY, {"mode": "speculative", "tree_budget": 8, "tree_depth": 4})
    assert tuned.mode == "speculative" and (tuned.tree.budget, tuned.tree.depth) == (4, 4)  # its depth's chain

"""One generation config: what a generation runs with, validated once, overridable per call.

    from specx.runtime import GenerationConfig, Generator, TreeConfig
    config = GenerationConfig(max_new_tokens=64, temperature=0.7, seed=1, tree=TreeConfig(budget=8, depth=4))
    gen.generate("Once upon a time", config)                    # as configured
    gen.generate("Once upon a time", config, max_new_tokens=8)  # one field overridden for this call
    gen.default_config(temperature=0.7)                         # what the bundle would choose (tuned defaults)

Fields left unset (``mode="auto"``, a tree field of ``None``, ``draft_choice="auto"``) are the bundle's to choose:
``specx bench --tune``'s record in its manifest, else the measured defaults (``specx.runtime.defaults``). The names
follow transformers' GenerationConfig and onnxruntime-genai's search options; keyword overrides use the flat names
of ``OVERRIDES`` (``tree_budget=8`` sets ``tree.budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from specx.errors import InvalidArgumentError
from specx.runtime.arguments import (check_choice, check_flag, check_int, check_number, check_optional_int,
                                     check_optional_number)
from specx.runtime.drafting import TreeShape
from specx.runtime.sampling import SamplingConfig

MODES = ("auto", "autoregressive", "speculative", "staged", "ngram")
DRAFTING_MODES = ("speculative", "staged")  # the modes that run a draft model
# How a draft model proposes when decoding samples: "sample" draws children from its distribution (rule B, the
# speculative sampling of Leviathan et al. / SpecInfer), "top" takes its top tokens (rule A: with a seed, the same
# tokens as plain decoding). Greedy decoding always takes the top tokens. "auto" = "sample": it measured faster
# (docs/benchmarks.md).
DRAFT_CHOICES = ("auto", "top", "sample")
DEFAULT_MAX_NEW_TOKENS = 128
# A tree whose shape is half given: a 5-token chain (specx.runtime.defaults says why).
DEFAULT_TREE_BUDGET = 5
DEFAULT_TREE_DEPTH = 5

# Keyword overrides of generate() / stream() / replace(): flat name -> (field of GenerationConfig, field of its tree).
TREE_OVERRIDES = {"tree_budget": "budget", "tree_depth": "depth", "tree_threshold": "threshold",
                  "tree_floor": "floor", "draft_choice": "draft_choice"}
TOP_LEVEL_OVERRIDES = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "mode", "tree")
OVERRIDES = (*TOP_LEVEL_OVERRIDES, *TREE_OVERRIDES)


@dataclass(frozen=True)
class TreeConfig:
    """The speculative modes' draft tree; ``None`` leaves a field to the bundle (its tuning, else the defaults)."""

    budget: int | None = None  # draft tokens the target verifies per step
    depth: int | None = None  # draft calls per step at most
    threshold: float | None = None  # adaptive depth: stop drafting once the best path value falls below it
    floor: float | None = None  # verify only the nodes whose path value reaches it
    draft_choice: str = "auto"  # sampling with a draft model: drawn children ("sample") or top tokens ("top")

    def __post_init__(self) -> None:
        _set(self, "budget", check_optional_int("tree_budget", self.budget))
        _set(self, "depth", check_optional_int("tree_depth", self.depth))
        _set(self, "threshold", check_optional_number("tree_threshold", self.threshold))
        _set(self, "floor", check_optional_number("tree_floor", self.floor))
        check_choice("draft choice", self.draft_choice, DRAFT_CHOICES)
        self.shape()  # the shape checks (depth >= 1, budget >= depth, threshold and floor in [0, 1)) with defaults

    def shape(self) -> TreeShape:
        """The step's tree: unset sizes from the half-given defaults, unset threshold and floor 0."""
        return tree_shape(self.budget, self.depth, self.threshold or 0.0, self.floor or 0.0)


@dataclass(frozen=True)
class GenerationConfig:
    """What one generation runs with. Construction validates every field (an InvalidArgumentError names it)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: a fresh random seed
    ignore_eos: bool = False  # keep generating past the end-of-sequence token(s)
    mode: str = "auto"  # one of MODES; auto: the bundle's tuned or best mode
    tree: TreeConfig = field(default_factory=TreeConfig)

    def __post_init__(self) -> None:
        _set(self, "max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, minimum=1))
        _set(self, "temperature", check_number("temperature", self.temperature))
        _set(self, "top_k", check_int("top_k", self.top_k))
        _set(self, "top_p", check_number("top_p", self.top_p))
        _set(self, "seed", check_optional_int("seed", self.seed))
        _set(self, "ignore_eos", check_flag("ignore_eos", self.ignore_eos))
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.tree, TreeConfig):
            raise InvalidArgumentError(f"tree must be a TreeConfig, got {type(self.tree).__name__}; pass "
                                       "TreeConfig(budget=..., depth=...) or the tree_* keywords")
        SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)  # temperature >= 0, top_p in (0, 1], ...

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def draws_children(self) -> bool:
        """Sampling with a draft model whose children are drawn from its distribution (rule B)."""
        return self.tree.draft_choice != "top" and self.temperature > 0 and self.mode in DRAFTING_MODES

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A copy with fields replaced, by the flat names of OVERRIDES; an unknown name is an InvalidArgumentError."""
        unknown = sorted(set(overrides) - set(OVERRIDES))
        if unknown:
            raise InvalidArgumentError(f"unknown generation option(s) {', '.join(unknown)}; use "
                                       f"{', '.join(OVERRIDES)}")
        if not overrides:
            return self
        tree = overrides.pop("tree", self.tree)
        tree_fields = {TREE_OVERRIDES[k]: overrides.pop(k) for k in list(overrides) if k in TREE_OVERRIDES}
        if tree_fields:
            if not isinstance(tree, TreeConfig):  # replace() below would fail on it before the check could name it
                raise InvalidArgumentError(f"tree must be a TreeConfig, got {type(tree).__name__}")
            tree = replace(tree, **tree_fields)
        return replace(self, tree=tree, **overrides)

    def to_overrides(self) -> dict[str, Any]:
        """The config as flat keyword overrides (what replace() and generate() take)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tree"}
        return {**flat, **{key: getattr(self.tree, name) for key, name in TREE_OVERRIDES.items()}}


def as_config(config: Any, overrides: dict[str, Any]) -> GenerationConfig:
    """``config`` (None: the defaults) with ``overrides`` applied: the one entry point of generate() and stream()."""
    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, GenerationConfig):
        raise InvalidArgumentError(f"config must be a GenerationConfig, got {config!r} ({type(config).__name__}); "
                                   "pass options such as max_new_tokens by keyword")
    return config.replace(**overrides)


def tree_shape(budget: int | None, depth: int | None, threshold: float = 0.0, floor: float = 0.0) -> TreeShape:
    """The tree for a step: defaults where not given; a budget never below the depth unless asked for."""
    depth = DEFAULT_TREE_DEPTH if depth is None else depth
    budget = max(DEFAULT_TREE_BUDGET, depth) if budget is None else budget
    return TreeShape(budget=budget, depth=depth, threshold=threshold, floor=floor)


def _set(instance: object, name: str, value: Any) -> None:
    """Store a validated, normalised value (a numpy integer as int, an int as float) on a frozen dataclass."""
    object.__setattr__(instance, name, value)

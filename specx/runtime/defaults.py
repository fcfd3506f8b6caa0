"""What a generation runs with where its config leaves a field to the bundle: the record `specx bench --tune` wrote
into the manifest for this temperature (greedy or sampling), else the defaults measured here (docs/benchmarks.md).

``resolve`` turns a GenerationConfig with unset fields (mode "auto", tree fields None, draft choice "auto") into one
with every field set; Generator.default_config shows it, and a resolved config passed back runs the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from specx.errors import InvalidArgumentError
from specx.runtime.config import DRAFTING_MODES, GenerationConfig, TreeConfig, tree_shape
from specx.runtime.drafting import TreeShape

# Default tree: a 5-token chain with adaptive depth (config.DEFAULT_TREE_BUDGET / DEPTH), measured on SmolLM2-135M
# with a self:int8 draft on a 2-core CPU (docs/benchmarks.md): a fixed 5-chain gave greedy 1.25x and T=1 0.43x; an
# 8-chain with the same thresholds gave 1.25x and 0.78x but lost in staged (1.10x vs 1.19x) and ngram mode (0.81x vs
# 0.93x), whose chains do not stop early. Drafting stops once the best unprocessed path value falls below the
# threshold (lower when greedy: acceptance follows the draft's argmax more closely than it follows a sampled draw).
GREEDY_TREE_THRESHOLD = 0.1
# A trained feature draft stops deepening sooner: 0.2 measured 1.44x against 0.1's 1.42x (24 prompts, 4x4 chain;
# 0.2 led in every chain shape of a 12-prompt sweep). Derived and separate drafts keep 0.1 (0.3 measured slower for
# the int8 self-draft, 1.23x vs 1.26x; 0.2 not measured for them).
FEATURE_GREEDY_TREE_THRESHOLD = 0.2
# ... and grows a tree of 8 nodes over 4 levels (2 children a node) of which it verifies only the nodes whose path
# value reaches the floor (whatever the shape, unless a floor is given): 24 prompts in one process, 1.49x against
# 1.38x for the same tree without a floor (6 nodes a pass, each ~3-5% of a step on 2 cores) and 1.47x for the 4x4
# chain (tau 2.15 / 2.19 / 1.86; docs/benchmarks.md).
FEATURE_GREEDY_TREE = (8, 4)  # (budget, depth)
FEATURE_GREEDY_TREE_FLOOR = 0.05
SAMPLING_TREE_THRESHOLD = 0.5  # top children (rule A)
DRAWN_TREE_THRESHOLD = 0.1  # drawn children (rule B): a trained draft measured 0.05-0.1 best (docs/benchmarks.md)
UNTUNED_DRAFT_CHOICE = "top"  # a sampling record without a draft choice predates drawn children: rule A measured it
# A chains-only target (int8-activation CPU kernels) untuned: greedy n-gram 1-chains, whatever the draft. SmolLM2
# int4 block 32, 16 held-out prompts, one run: n-gram 1-chains 1.23x its plain decoding, a trained draft's 1-chains
# 1.07x (other runs: n-gram 5-chains 1.06x, 2-chains 1.10x; docs/benchmarks.md); the trained tree's depth as a
# 4-chain 0.86x (6 of those prompts). A 2-row pass costs ~1.07x a step there and each row more ~0.15x, so one
# proposed token is what pays. Sampling decodes plainly: a trained draft's drawn 1-chains measured 0.98x plain
# sampling at T=1 (16 held-out prompts; 1.05x on the runtime-padded graph before), n-gram 1-chains 1.03x.
CHAINS_ONLY_DEPTH = 1


@dataclass(frozen=True)
class DraftKind:
    """What a bundle drafts with, as far as the defaults depend on it."""

    model: bool  # a draft model: derived, separate or trained
    trained: bool = False  # a trained feature draft (`specx train-draft`)
    exact_trees: bool = True  # the target's tree passes give each node what one-token steps give it (measured at
                              # export: manifest parity row_consistent); without it no mode may verify a tree
    exact_chains: bool = True  # the same for chains (parity chains_exact): with it but not exact_trees, every mode
                               # verifies chains only (int8-activation targets, whose passes are padded)

    @property
    def speculates(self) -> bool:
        """Whether any verify pass keeps plain decoding's output (else the bundle decodes plainly)."""
        return self.exact_trees or self.exact_chains

    @property
    def chains_only(self) -> bool:
        return self.exact_chains and not self.exact_trees


def resolve(config: GenerationConfig, draft: DraftKind, tuned: Mapping[str, Any] | None) -> GenerationConfig:
    """``config`` with every field the bundle chooses set: what was asked, else ``tuned`` (the manifest's tuning
    record for its temperature: ``tuned_record``), else the measured defaults. Raises InvalidArgumentError for a mode
    the bundle cannot run."""
    sampling = config.temperature > 0
    tuned = dict(tuned or {})
    mode = resolve_mode(tuned["mode"] if config.mode == "auto" and tuned.get("mode") else config.mode, sampling, draft)
    choice = config.tree.draft_choice
    if choice == "auto" and sampling and tuned:
        choice = tuned.get("draft_choice", UNTUNED_DRAFT_CHOICE)  # the tuning holds for what it measured
    draw = choice != "top" and sampling and mode in DRAFTING_MODES
    if sampling and mode in DRAFTING_MODES:
        choice = "sample" if draw else "top"  # where it matters, "auto" is decided
    shape = _tree(config.tree, tuned, mode, config.temperature, draw, draft.trained)
    if draft.chains_only:
        shape = _chain(shape, config.tree, untuned=not tuned.get("tree_budget"))
    return replace(config, mode=mode, tree=TreeConfig(shape.budget, shape.depth, shape.threshold, shape.floor, choice))


def tuned_record(tuning: Mapping[str, Any] | None, sampling: bool) -> dict[str, Any]:
    """The record of a manifest's ``tuning`` for greedy decoding or sampling ({} when it has none)."""
    return dict((tuning or {}).get("sampling" if sampling else "greedy") or {})


def resolve_mode(mode: str, sampling: bool, draft: DraftKind) -> str:
    """A concrete mode: ``auto`` as measured best for the bundle's draft; a drafting mode needs a draft model; a
    target whose tree passes are not exact decodes plainly (auto) or refuses the tree modes."""
    if not draft.speculates:
        if mode == "auto":
            return "autoregressive"
        if mode != "autoregressive":
            raise InvalidArgumentError(
                f"mode {mode!r} would change this bundle's output: its target computes a multi-token pass "
                "differently from one-token steps (weight-only quantized kernels at accuracy_level 4; see the "
                "manifest's parity tree_vs_steps), so verifying a tree is not exact. Use --mode autoregressive, or "
                "export the target with exact kernels (--dtype fp32, or int4/int8 with --quant-accuracy 0)")
    if mode == "auto":
        # Greedy: stage 2 costs nothing when the context offers no proposal (measured never slower with derived
        # and separate drafts); with a trained feature draft it never won in 8 paired 24-prompt runs (0.01-0.07x
        # behind speculative, docs/benchmarks.md). Sampling with drawn children (rule B) measured faster than plain
        # sampling with a trained feature draft (1.29-1.33x) and a derived int8 one (1.12x; rule A: 1.06-1.07x and
        # 0.78x, docs/benchmarks.md): auto speculates with any draft model (stage 2 proposes nothing to drawn
        # children, so plain speculative). Without one, n-gram chains are deterministic proposals (rule A): ngram
        # mode measured 0.97x there.
        if sampling:
            return "speculative" if draft.model and not draft.chains_only else "autoregressive"
        if not draft.model or draft.chains_only:  # chains only: n-gram 1-chains measured best (CHAINS_ONLY_DEPTH)
            return "ngram"
        return "speculative" if draft.trained else "staged"
    if mode in DRAFTING_MODES and not draft.model:
        raise InvalidArgumentError(f"mode {mode!r} needs a bundle with a draft model; export one with --draft, or use "
                                   "--mode ngram or autoregressive")
    return mode  # staged and ngram without a table: the n-gram model counts the prompt and output only


def _tree(asked: TreeConfig, tuned: dict[str, Any], mode: str, temperature: float, draw: bool,
          trained: bool) -> TreeShape:
    """The step's tree: what was asked, else what `--tune` measured, else the measured defaults."""
    trained_greedy = trained and temperature == 0 and mode in DRAFTING_MODES
    budget, depth, floor = _tree_size(asked, tuned, trained_greedy)
    threshold = asked.threshold
    if mode == "ngram":  # an n-gram chain has no draft values to rank or stop on: the depth alone bounds it
        floor, threshold = 0.0, 0.0
    elif draw:
        floor = 0.0  # nothing drawn is dropped
    if threshold is None:
        threshold = tuned.get("tree_threshold")
    if threshold is None:
        threshold = _default_threshold(temperature, draw, trained)
    return tree_shape(budget, depth, threshold, floor)


def _chain(shape: TreeShape, asked: TreeConfig, untuned: bool) -> TreeShape:
    """A target whose chain passes alone are exact verifies chains: the shape's depth, one node a level (a budget
    asked above the depth is refused; a tuned tree becomes its depth's chain); with nothing asked or tuned, the
    measured CHAINS_ONLY_DEPTH."""
    if asked.budget is not None and asked.budget > shape.depth:
        raise InvalidArgumentError(
            f"a tree budget of {asked.budget} over a depth of {shape.depth} would verify a tree, and this bundle's "
            "target keeps plain decoding's output with chains only (int8-activation kernels; manifest parity "
            "chains_exact). Ask for a chain (--tree-budget equal to --tree-depth), or export the target with "
            "--quant-accuracy 0 for exact trees")
    depth = CHAINS_ONLY_DEPTH if untuned and asked.budget is None and asked.depth is None else shape.depth
    return TreeShape(budget=depth, depth=depth, threshold=shape.threshold, floor=0.0)


def _tree_size(asked: TreeConfig, tuned: dict[str, Any], trained_greedy: bool) -> tuple[int | None, int | None, float]:
    """(budget, depth, floor): a shape asked for (even half of one) is kept; the tuned floor comes with the tuned
    shape only (a record without one was measured without one)."""
    budget, depth, floor = asked.budget, asked.depth, asked.floor
    if budget is None and depth is None:
        if tuned.get("tree_budget"):
            budget, depth = tuned["tree_budget"], tuned["tree_depth"]
            if floor is None:
                floor = tuned.get("tree_floor", 0.0)
        elif trained_greedy:
            budget, depth = FEATURE_GREEDY_TREE
    if floor is None:
        floor = FEATURE_GREEDY_TREE_FLOOR if trained_greedy else 0.0
    return budget, depth, floor


def _default_threshold(temperature: float, draw: bool, trained: bool) -> float:
    if temperature == 0:
        return FEATURE_GREEDY_TREE_THRESHOLD if trained else GREEDY_TREE_THRESHOLD
    return DRAWN_TREE_THRESHOLD if draw else SAMPLING_TREE_THRESHOLD

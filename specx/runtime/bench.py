"""`specx bench`: plain decoding and every mode a bundle supports, back to back on the same prompts.

For each prompt and temperature, autoregressive decoding runs first and each mode right after it on the same
prompt, so every speed-up is a ratio measured in the same minute on the same graph; summaries are medians over
prompts of those per-prompt ratios. Greedy outputs of every mode are compared with plain decoding token for token.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from specx.errors import InvalidArgumentError
from specx.progress import NO_PROGRESS, Bar, Bars
from specx.runtime.config import GenerationConfig
from specx.runtime.generator import Generator

SEED = 1234
WARMUP_TOKENS = 16
BENCH_TOKENS = 128  # tokens per generation unless asked otherwise
BUILTIN_PROMPTS = "prompts.jsonl"  # specx/data: 24 short prompts (code, chat, prose, lists, logs, math)


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    text: str


@dataclass(frozen=True)
class BenchRow:
    mode: str
    temperature: float
    prompt: str
    kind: str
    tokens_per_second: float
    speedup: float  # tokens/s over autoregressive tokens/s on the same prompt, measured back to back
    tau: float  # tokens per target call
    draft_calls_per_token: float
    weight_bytes_ratio: float
    overhead: float  # share of wall time outside model runs
    identical: bool  # same tokens as autoregressive decoding (greedy: must; sampling: only with top proposals)
    draft_cost: float = 0.0  # mean draft call time over plain decoding's one-token target step time
    target_share: float = 0.0  # shares of wall time: target runs, draft runs, n-gram proposals
    draft_share: float = 0.0
    draft2_share: float = 0.0
    nodes_per_verify: float = 0.0  # draft nodes the target verified per pass


def load_prompts(path: Path | None = None, limit: int | None = None) -> list[Prompt]:
    """JSON lines ({"id", "kind", "prompt"}) or plain text lines; the built-in set when ``path`` is None; the first
    ``limit`` of them (all when None)."""
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1 (or left out for every prompt), got {limit}")
    if path is None:
        text = resources.files("specx.data").joinpath(BUILTIN_PROMPTS).read_text()
    else:
        if not path.is_file():
            raise InvalidArgumentError(f"prompts file {path} does not exist")
        text = path.read_text()
    prompts = []
    for n, line in enumerate(filter(str.strip, text.splitlines())):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line
        if isinstance(row, dict) and "prompt" in row:
            prompts.append(Prompt(str(row.get("id", n)), str(row.get("kind", "-")), str(row["prompt"])))
        else:
            prompts.append(Prompt(str(n), "-", line))
    if not prompts:
        raise InvalidArgumentError("no prompts to benchmark")
    return prompts if limit is None else prompts[:limit]


def supported_modes(gen: Generator) -> list[str]:
    """Staged and n-gram modes run without a sampled table too (the n-gram model counts the context). None where the
    target's tree passes are not exact (they would change the output): such a bundle decodes plainly."""
    if not gen.draft_kind.speculates:
        return []
    return (["speculative", "staged"] if gen.draft is not None else []) + ["ngram"]


def check_modes(gen: Generator, modes: Sequence[str]) -> list[str]:
    supported = supported_modes(gen)
    unknown = [m for m in modes if m not in supported and m != "autoregressive"]  # plain decoding always runs
    if unknown:
        raise InvalidArgumentError(f"this bundle cannot run mode(s) {', '.join(unknown)}; it supports "
                                   f"{', '.join(supported) or 'autoregressive decoding only'}")
    return [m for m in modes if m != "autoregressive"]  # plain decoding is every bench's baseline


def run_bench(gen: Generator, prompts: Sequence[Prompt], modes: Sequence[str], temperatures: Sequence[float],
              config: GenerationConfig, report: Callable[[BenchRow], None] = lambda row: None,
              peers: Sequence = ()) -> list[BenchRow]:
    """``config``: the tokens per generation and the speculative modes' tree (fields left unset: the bundle's
    defaults); every run ignores EOS and seeds SEED, with its own mode and temperature. ``peers``
    (specx.peers.Peer): other runtimes on the same prompt ids, right after plain decoding."""
    config = config.replace(ignore_eos=True, seed=SEED)
    new_tokens = config.max_new_tokens
    for mode in ("autoregressive", *modes):  # warm-up: every session and code path once
        gen.generate(prompts[0].text, config, max_new_tokens=WARMUP_TOKENS, mode=mode)
    warm_ids = gen.bundle.tokenizer.encode(prompts[0].text).ids
    for peer in peers:
        peer.generate(warm_ids, WARMUP_TOKENS, 0.0, SEED)
    rows = []
    for temperature in temperatures:
        for prompt in prompts:
            plain = gen.generate(prompt.text, config, mode="autoregressive", temperature=temperature)
            step = plain_step_seconds(plain.stats)
            for mode in ["autoregressive", *modes]:
                result = plain if mode == "autoregressive" else \
                    gen.generate(prompt.text, config, mode=mode, temperature=temperature)
                s = result.stats
                row = BenchRow(mode, temperature, prompt.id, prompt.kind, s.tokens_per_second,
                               s.tokens_per_second / plain.stats.tokens_per_second,
                               s.tokens_per_target_call, s.draft_calls / s.new_tokens, s.weight_bytes_ratio,
                               s.overhead_fraction, result.tokens == plain.tokens,
                               s.draft_seconds / s.draft_calls / step if s.draft_calls and step else 0.0,
                               *(x / s.seconds for x in (s.target_seconds, s.draft_seconds, s.draft2_seconds)),
                               nodes_per_verify=s.nodes_per_verify)
                rows.append(row)
                report(row)
            ids = gen.bundle.tokenizer.encode(prompt.text).ids
            for peer in peers:
                tokens, seconds = peer.generate(ids, new_tokens, temperature, SEED)
                rate = len(tokens) / seconds if seconds > 0 else 0.0
                row = BenchRow(peer.name, temperature, prompt.id, prompt.kind, rate,
                               rate / plain.stats.tokens_per_second, 1.0, 0.0, 1.0, 0.0, tokens == plain.tokens)
                rows.append(row)
                report(row)
    return rows


def plain_step_seconds(stats) -> float:
    """One-token target step of plain decoding: target time after the prompt pass, per call."""
    steps = stats.target_calls - 1
    return max(0.0, stats.target_seconds - stats.prefill_seconds) / steps if steps > 0 else 0.0


def summarise(rows: Sequence[BenchRow]) -> list[dict]:
    """One line per (mode, temperature): medians over prompts, identical-output counts."""
    out = []
    keys = sorted({(r.temperature, r.mode) for r in rows}, key=lambda k: (k[0], k[1] != "autoregressive", k[1]))
    for temperature, mode in keys:
        group = [r for r in rows if r.mode == mode and r.temperature == temperature]
        med = {f: statistics.median(getattr(r, f) for r in group)
               for f in ("tokens_per_second", "speedup", "tau", "draft_calls_per_token", "weight_bytes_ratio",
                         "overhead", "draft_cost", "target_share", "draft_share", "draft2_share",
                         "nodes_per_verify")}
        kinds = sorted({r.kind for r in group})
        by_kind = {k: statistics.median(r.speedup for r in group if r.kind == k) for k in kinds}
        out.append({"mode": mode, "temperature": temperature, **med,
                    "identical": f"{sum(r.identical for r in group)}/{len(group)}", "speedup_by_kind": by_kind})
    return out


def format_table(summary: Sequence[dict]) -> str:
    width = max([15, *(len(s["mode"]) for s in summary)])  # peers' names (onnxruntime-genai) are longer
    header = f"{'mode':<{width}} {'T':>4} {'tokens/s':>9} {'speed-up':>9} {'tau':>6} {'nodes':>5} " \
             f"{'draft/tok':>9} {'bytes':>6} {'overhead':>8} {'draft cost':>10} {'identical':>9}"
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(f"{s['mode']:<{width}} {s['temperature']:>4g} {s['tokens_per_second']:>9.1f} "
                     f"{s['speedup']:>8.2f}x {s['tau']:>6.2f} {s['nodes_per_verify']:>5.1f} "
                     f"{s['draft_calls_per_token']:>9.2f} {s['weight_bytes_ratio']:>6.2f} {s['overhead']:>8.1%} "
                     f"{s['draft_cost']:>10.3f} {s['identical']:>9}")
    return "\n".join(lines)


def rows_to_json(rows: Sequence[BenchRow], summary: Sequence[dict], meta: dict) -> str:
    return json.dumps({"meta": meta, "summary": list(summary), "rows": [asdict(r) for r in rows]}, indent=2)


# -- tuning -----------------------------------------------------------------------------------------------------
# (budget, depth): chains and small trees; the short chains for targets whose passes are not flat (a quantized
# target's exact 4-row pass measured 2.6x its step on a 2-core CPU, docs/benchmarks.md); the 1- and 5-chains for
# padded targets (int4 at block 32: a 2-row pass ~1.07x the step with its dummy attention row; at larger blocks the
# runtime's padding makes the step a 2-row pass already)
TUNE_SHAPES = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (8, 4), (12, 6))
# Sampling decodes with drawn children (rule B), whose best thresholds measured 0.05-0.1 (0.5 was rule A's).
TUNE_THRESHOLDS = {"greedy": (0.05, 0.1, 0.2), "sampling": (0.05, 0.1, 0.2)}
# Trees (budget > depth) also try verifying only their likely nodes when greedy: a trained draft's 8x4 tree measured
# 1.49x with floor 0.05 against 1.38x without (24 prompts, docs/benchmarks.md). Drawn children are never dropped, and
# n-gram chains are not ranked, so neither tries a floor.
TUNE_FLOORS = {"greedy": (0.0, 0.05), "sampling": (0.0,)}
TUNE_PROMPTS = 8
TUNE_TOKENS = 64


@dataclass(frozen=True)
class Candidate:
    mode: str
    tree_budget: int = 0
    tree_depth: int = 0
    tree_threshold: float = 0.0
    tree_floor: float = 0.0

    def kwargs(self) -> dict:
        if self.mode == "autoregressive":
            return {"mode": self.mode}
        return {"mode": self.mode, "tree_budget": self.tree_budget, "tree_depth": self.tree_depth,
                "tree_threshold": self.tree_threshold, "tree_floor": self.tree_floor}


def candidates(modes: Sequence[str], sampling: bool, chains_only: bool = False) -> list[Candidate]:
    """The shapes `--tune` tries; ``chains_only`` (a target whose chain passes alone are exact): the chains."""
    key = "sampling" if sampling else "greedy"
    shapes = [(b, d) for b, d in TUNE_SHAPES if b == d or not chains_only]
    return [Candidate(mode, budget, depth, threshold, floor) for mode in modes for budget, depth in shapes
            for threshold in TUNE_THRESHOLDS[key] for floor in TUNE_FLOORS[key]
            if not floor or (budget > depth and mode != "ngram")]


def tune(gen: Generator, prompts: Sequence[Prompt], modes: Sequence[str], temperature: float, new_tokens: int,
         report: Callable[[Candidate, float], None] = lambda c, s: None,
         bars: Bars = NO_PROGRESS.bar) -> tuple[Candidate, float, list[dict]]:
    """Every candidate (mode x tree shape x threshold) on every prompt, each prompt's plain decoding run before and
    after them (their mean is the baseline of that prompt's ratios); the winner has the best median speed-up, and
    plain decoding wins when nothing beats it. ``bars(name, total)``: progress, one step per generation."""
    pool = candidates(modes, temperature > 0, chains_only=gen.draft_kind.chains_only)
    if not pool:
        why = "" if gen.draft_kind.speculates else (
            ": its target's tree passes are not exact (manifest parity tree_vs_steps), so only plain decoding keeps "
            "its output")
        raise InvalidArgumentError(f"nothing to tune: this bundle decodes plainly{why}")
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, temperature=temperature, seed=SEED)
    gen.generate(prompts[0].text, max_new_tokens=WARMUP_TOKENS, ignore_eos=True, **pool[0].kwargs())  # warm-up
    speedups: dict[Candidate, list[float]] = {c: [] for c in pool}
    bar = bars(f"tuning {'sampling' if temperature > 0 else 'greedy'} decoding (generations)",
               len(prompts) * (len(pool) + 2))
    try:
        for prompt in prompts:
            before = _rate(gen, prompt, config.replace(mode="autoregressive"), bar)
            rates = {c: _rate(gen, prompt, config.replace(**c.kwargs()), bar) for c in pool}
            after = _rate(gen, prompt, config.replace(mode="autoregressive"), bar)
            for candidate, rate in rates.items():
                speedups[candidate].append(rate / ((before + after) / 2))
    finally:
        bar.close()
    medians = {c: statistics.median(v) for c, v in speedups.items()}
    table = [{**asdict(c), "speedup": m} for c, m in medians.items()]
    for c, m in medians.items():
        report(c, m)
    best = max(pool, key=medians.__getitem__)
    best_speedup = medians[best]
    if best_speedup <= 1.0:
        return Candidate("autoregressive"), 1.0, table
    return best, best_speedup, table


def _rate(gen: Generator, prompt: Prompt, config: GenerationConfig, bar: Bar) -> float:
    rate = gen.generate(prompt.text, config).stats.tokens_per_second
    bar.update(1)
    return rate


def tuning_record(best: Candidate, speedup: float, prompts: int, new_tokens: int, machine: dict) -> dict:
    """What the manifest keeps for one temperature: the winner, its measured speed-up, and where."""
    # draft_choice: what sampling was measured with (records without it predate drawn proposals: rule A's "top")
    return {**best.kwargs(), "draft_choice": "sample", "speedup": round(speedup, 3), "prompts": prompts,
            "new_tokens": new_tokens, **machine}


def write_tuning(bundle_dir: Path, tuning: dict) -> None:
    """Merge ``tuning`` ({"greedy": ..., "sampling": ...}) into the bundle's manifest, atomically."""
    from dataclasses import replace

    from specx.runtime.manifest import Manifest

    manifest = Manifest.read(bundle_dir)
    merged = {**(manifest.tuning or {}), **tuning}
    replace(manifest, tuning=merged).write(bundle_dir)


# -- plot -------------------------------------------------------------------------------------------------------
def plot(rows: Sequence[BenchRow], path: Path) -> None:
    """Speed-up and tau per mode and prompt kind (medians), one panel per temperature; needs matplotlib
    (pip install 'specx[plot]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'specx[plot]'") from exc
    temperatures = sorted({r.temperature for r in rows})
    kinds = sorted({r.kind for r in rows})
    modes = [m for m in dict.fromkeys(r.mode for r in rows) if m != "autoregressive"]
    fig, axes = plt.subplots(2, len(temperatures), figsize=(4.5 * len(temperatures), 6), squeeze=False)
    width = 0.8 / max(1, len(modes))
    for col, temperature in enumerate(temperatures):
        for row, (field, label) in enumerate((("speedup", "speed-up vs plain"), ("tau", "tokens per target call"))):
            ax = axes[row][col]
            for k, mode in enumerate(modes):
                values = [statistics.median([getattr(r, field) for r in rows if r.mode == mode and r.kind == kind
                                             and r.temperature == temperature] or [0.0]) for kind in kinds]
                ax.bar([i + k * width for i in range(len(kinds))], values, width, label=mode)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(kinds))], kinds, rotation=30)
            ax.set_ylabel(label)
            ax.set_title(f"T={temperature:g}")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

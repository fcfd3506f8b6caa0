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
from specx.runtime.generator import Generator

SEED = 1234
WARMUP_TOKENS = 16
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
    identical: bool  # same tokens as autoregressive decoding (greedy: must; sampling: same seed, usually)


def load_prompts(path: Path | None = None, limit: int | None = None) -> list[Prompt]:
    """JSON lines ({"id", "kind", "prompt"}) or plain text lines; the built-in set when ``path`` is None."""
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
    return prompts[:limit] if limit else prompts


def supported_modes(gen: Generator) -> list[str]:
    modes = []
    if gen.draft is not None:
        modes.append("speculative")
        if gen.ngram is not None:
            modes.append("staged")
    if gen.ngram is not None:
        modes.append("ngram")
    return modes


def check_modes(gen: Generator, modes: Sequence[str]) -> list[str]:
    supported = supported_modes(gen)
    unknown = [m for m in modes if m not in supported]
    if unknown:
        raise InvalidArgumentError(f"this bundle cannot run mode(s) {', '.join(unknown)}; it supports "
                                   f"{', '.join(supported) or 'autoregressive decoding only'}")
    return list(modes)


def run_bench(gen: Generator, prompts: Sequence[Prompt], modes: Sequence[str], temperatures: Sequence[float],
              new_tokens: int, report: Callable[[BenchRow], None] = lambda row: None) -> list[BenchRow]:
    gen.generate(prompts[0].text, max_new_tokens=WARMUP_TOKENS, ignore_eos=True, mode="autoregressive")  # warm-up
    rows = []
    for temperature in temperatures:
        for prompt in prompts:
            kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, temperature=temperature, seed=SEED)
            plain = gen.generate(prompt.text, mode="autoregressive", **kwargs)
            for mode in ["autoregressive", *modes]:
                result = plain if mode == "autoregressive" else gen.generate(prompt.text, mode=mode, **kwargs)
                s = result.stats
                row = BenchRow(mode, temperature, prompt.id, prompt.kind, s.tokens_per_second,
                               s.tokens_per_second / plain.stats.tokens_per_second,
                               s.tokens_per_target_call, s.draft_calls / s.new_tokens, s.weight_bytes_ratio,
                               s.overhead_fraction, result.tokens == plain.tokens)
                rows.append(row)
                report(row)
    return rows


def summarise(rows: Sequence[BenchRow]) -> list[dict]:
    """One line per (mode, temperature): medians over prompts, identical-output counts."""
    out = []
    keys = sorted({(r.temperature, r.mode) for r in rows}, key=lambda k: (k[0], k[1] != "autoregressive", k[1]))
    for temperature, mode in keys:
        group = [r for r in rows if r.mode == mode and r.temperature == temperature]
        med = {f: statistics.median(getattr(r, f) for r in group)
               for f in ("tokens_per_second", "speedup", "tau", "draft_calls_per_token", "weight_bytes_ratio",
                         "overhead")}
        out.append({"mode": mode, "temperature": temperature, **med,
                    "identical": f"{sum(r.identical for r in group)}/{len(group)}"})
    return out


def format_table(summary: Sequence[dict]) -> str:
    header = f"{'mode':<15} {'T':>4} {'tokens/s':>9} {'speed-up':>9} {'tau':>6} {'draft/tok':>9} {'bytes':>6} " \
             f"{'overhead':>8} {'identical':>9}"
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(f"{s['mode']:<15} {s['temperature']:>4g} {s['tokens_per_second']:>9.1f} {s['speedup']:>8.2f}x "
                     f"{s['tau']:>6.2f} {s['draft_calls_per_token']:>9.2f} {s['weight_bytes_ratio']:>6.2f} "
                     f"{s['overhead']:>8.1%} {s['identical']:>9}")
    return "\n".join(lines)


def rows_to_json(rows: Sequence[BenchRow], summary: Sequence[dict], meta: dict) -> str:
    return json.dumps({"meta": meta, "summary": list(summary), "rows": [asdict(r) for r in rows]}, indent=2)

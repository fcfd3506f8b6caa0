"""Speculative, staged and n-gram decoding vs autoregressive decoding of the same target graph, on the development
prompts.

For every bundle and tree shape: tokens/s and its ratio to autoregressive decoding (measured back to back on the same
prompt, same process), tokens per target call (tau), draft calls per token, weight-bytes ratio, and the time split
(target runs, draft runs, everything else = runtime overhead). Greedy and sampled (temperature 1, fixed seeds).

    python benchmarks/speculative.py --bundle DIR [--bundle DIR ...] [--modes speculative,staged,ngram]
                                     [--shapes 4x4,8x4] [--prompts 24] [--new-tokens 128] [--temperatures 0,1]
                                     [--json out.json]

A shape BxD is a tree of B draft tokens and depth D (B == D is a chain: classic speculative decoding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_prompts, machine, median  # noqa: E402
from specx.runtime import Generator  # noqa: E402

SEED = 1234


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        budget, depth = item.lower().split("x")
        shapes.append((int(budget), int(depth)))
    return shapes


def run_one(gen: Generator, ids: list[int], new_tokens: int, temperature: float, mode: str,
            shape: tuple[int, int] | None) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, mode=mode, temperature=temperature, seed=SEED)
    if shape is not None:
        kwargs.update(tree_budget=shape[0], tree_depth=shape[1])
    result = gen.generate(ids, **kwargs)
    s = result.stats
    return {"tokens": result.tokens, "tps": s.tokens_per_second, "tau": s.tokens_per_target_call,
            "draft_calls_per_token": s.draft_calls / s.new_tokens, "weight_bytes_ratio": s.weight_bytes_ratio,
            "overhead": s.overhead_fraction, "draft_share": s.draft_seconds / s.seconds,
            "draft2_share": s.draft2_seconds / s.seconds, "draft_calls_saved": s.draft_calls_saved,
            "draft2_accept_rate": s.draft2_accepted / s.draft2_proposed if s.draft2_proposed else 0.0,
            "target_share": s.target_seconds / s.seconds, "histogram": s.accepted_histogram}


def summarise(rows: list[dict]) -> dict:
    keys = ("speedup", "tps", "ar_tps", "tau", "draft_calls_per_token", "weight_bytes_ratio", "overhead",
            "draft_share", "draft2_share", "target_share", "draft2_accept_rate")
    out = {k: round(median([r[k] for r in rows]), 4) for k in keys}
    out["identical_greedy"] = f"{sum(r['identical'] for r in rows)}/{len(rows)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--modes", default="speculative")
    parser.add_argument("--shapes", default="4x4,8x4")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--no-ngram-table", action="store_true",
                        help="ignore the bundle's n-gram table: staged and ngram modes count the context only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    results: dict[str, list[dict]] = defaultdict(list)
    for bundle in args.bundle:
        gen = Generator.load(bundle, provider=args.provider)
        if args.no_ngram_table:
            gen.ngram = None
        draft = gen.bundle.manifest.draft.source if gen.bundle.manifest.draft else "none"
        for temperature in temperatures:
            for prompt in prompts:
                ids = gen.bundle.tokenizer.encode(prompt["prompt"]).ids
                ar = run_one(gen, ids, args.new_tokens, temperature, "autoregressive", None)
                for mode, shape in itertools.product(args.modes.split(","), parse_shapes(args.shapes)):
                    sp = run_one(gen, ids, args.new_tokens, temperature, mode, shape)
                    row = {**{k: v for k, v in sp.items() if k != "tokens"}, "ar_tps": ar["tps"],
                           "speedup": sp["tps"] / ar["tps"], "identical": sp["tokens"] == ar["tokens"],
                           "kind": prompt["kind"], "id": prompt["id"]}
                    table = "online only" if gen.ngram is None and mode != "speculative" else ""
                    key = f"{mode} {table}| {draft if mode != 'ngram' else '-'} | {shape[0]}x{shape[1]} | T={temperature:g}"
                    results[key].append(row)
                    print(json.dumps({"config": key, **row}), flush=True)

    summary = {"machine": machine(), "prompts": len(prompts), "new_tokens": args.new_tokens, "configs": {}}
    for key, rows in results.items():
        by_kind = defaultdict(list)
        for r in rows:
            by_kind[r["kind"]].append(r)
        summary["configs"][key] = {"overall": summarise(rows),
                                   "speedup_by_kind": {k: round(median([r["speedup"] for r in v]), 3)
                                                       for k, v in sorted(by_kind.items())}}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": results}, indent=2))


if __name__ == "__main__":
    main()

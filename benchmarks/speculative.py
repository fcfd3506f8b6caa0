"""Speculative, staged and n-gram decoding vs autoregressive decoding of the same target graph, per tree shape and
adaptive-depth threshold: a thin wrapper over `specx bench`'s measuring code (specx.runtime.bench), so there is one
measuring code path. Each mode runs right after plain decoding on the same prompt; summaries are medians of the
per-prompt ratios, with the time split (target, draft, n-gram, rest) and the speed-up per prompt kind.

    python benchmarks/speculative.py --bundle DIR [--bundle DIR ...] [--modes speculative,staged,ngram]
                                     [--shapes 5x5,8x4] [--thresholds 0.1,0.2] [--floors 0,0.05] [--prompts 24]
                                     [--new-tokens 128] [--temperatures 0,1] [--no-ngram-table] [--json out.json]

A shape BxD is a tree of B draft tokens and depth D (B == D is a chain: classic speculative decoding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from specx.runtime import GenerationConfig, Generator  # noqa: E402
from specx.runtime import bench  # noqa: E402


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--modes", default="speculative")
    p.add_argument("--shapes", default="5x5", help="BxD tree budget x depth, comma-separated")
    p.add_argument("--thresholds", default="", help="adaptive-depth thresholds (default: the runtime's)")
    p.add_argument("--floors", default="", help="tree floors: verify only nodes whose path value reaches one "
                                                "(default: the runtime's)")
    p.add_argument("--draft-choices", default="auto",
                   help="when sampling: 'sample' (children drawn from the draft), 'top' (its top tokens), comma-separated")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--provider", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-ngram-table", action="store_true",
                   help="ignore the bundle's n-gram table: staged and ngram modes count the context only")
    p.add_argument("--json", type=Path)
    return p


def measure(args: argparse.Namespace) -> list[dict]:
    """Every bundle x shape x threshold through bench.run_bench; prints a table per configuration."""
    prompts = bench.load_prompts(None, args.prompts)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",") if t] or [None]
    floors = [float(f) for f in args.floors.split(",") if f] or [None]
    results = []
    for path in args.bundle:
        gen = Generator.load(path, provider=args.provider, threads=args.threads)
        if args.no_ngram_table:
            gen.ngram = None
        manifest = gen.bundle.manifest
        for shape in args.shapes.split(","):
            budget, depth = (int(x) for x in shape.lower().split("x"))
            for threshold, floor, choice in itertools.product(thresholds, floors, args.draft_choices.split(",")):
                tree = {"tree_budget": budget, "tree_depth": depth, "draft_choice": choice}
                if threshold is not None:
                    tree["tree_threshold"] = threshold
                if floor is not None:
                    tree["tree_floor"] = floor
                config = GenerationConfig(max_new_tokens=args.new_tokens).replace(**tree)
                rows = bench.run_bench(gen, prompts, args.modes.split(","), temperatures, config)
                summary = bench.summarise(rows)
                print(f"\n{path.name} (draft: {manifest.draft.source if manifest.draft else 'none'})  tree {shape}  "
                      f"threshold {threshold if threshold is not None else 'default'}  "
                      f"floor {floor if floor is not None else 'default'}  draft choice {choice}", flush=True)
                print(bench.format_table(summary), flush=True)
                for s in summary:
                    if s["mode"] != "autoregressive":
                        kinds = ", ".join(f"{k} {v:.2f}x" for k, v in s["speedup_by_kind"].items())
                        print(f"  {s['mode']} T={s['temperature']:g} by kind: {kinds}; time: target "
                              f"{s['target_share']:.0%}, draft {s['draft_share']:.0%}, n-gram {s['draft2_share']:.0%}")
                results.append({"bundle": str(path), "tree": tree,
                                "training": manifest.draft.training if manifest.draft else None,
                                "summary": summary, "rows": [asdict(r) for r in rows]})
    return results


def main() -> None:
    args = parser().parse_args()
    results = measure(args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

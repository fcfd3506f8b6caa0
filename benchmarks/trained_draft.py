"""Trained feature drafts vs autoregressive decoding of the same target graph (issue 8's benchmark).

A thin wrapper over `specx bench`'s measuring code (specx.runtime.bench): per bundle and tree shape, the modes run
back to back with plain decoding on every prompt; summaries are medians of per-prompt ratios. Adds what the issue
asks beyond `specx bench`: the draft's training record, and the tau-vs-training-tokens curve across bundles trained
with different budgets (a table, and a PNG when matplotlib is installed).

    python benchmarks/trained_draft.py --bundle DIR [--bundle DIR ...] [--shapes 5x5,8x4] [--thresholds 0.1]
                                       [--modes speculative,staged] [--temperatures 0,1] [--prompts 24]
                                       [--new-tokens 128] [--json out.json] [--plot docs/tau_vs_tokens.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from specx.runtime import Generator  # noqa: E402
from specx.runtime import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", required=True, type=Path)
    parser.add_argument("--shapes", default="5x5", help="BxD tree budget x depth, comma-separated")
    parser.add_argument("--thresholds", default="", help="adaptive-depth thresholds (default: the runtime's)")
    parser.add_argument("--modes", default="speculative,staged")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="tau vs training tokens, one point per bundle")
    args = parser.parse_args()

    prompts = bench.load_prompts(None, args.prompts)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",") if t] or [None]
    results = []
    for path in args.bundle:
        gen = Generator.load(path, provider="cpu", threads=args.threads)
        training = gen.bundle.manifest.draft.training if gen.bundle.manifest.draft else None
        for shape in args.shapes.split(","):
            budget, depth = (int(x) for x in shape.lower().split("x"))
            for threshold in thresholds:
                tree = {"tree_budget": budget, "tree_depth": depth}
                if threshold is not None:
                    tree["tree_threshold"] = threshold
                rows = bench.run_bench(gen, prompts, args.modes.split(","), temperatures, args.new_tokens,
                                       tree=tree)
                summary = bench.summarise(rows)
                print(f"\n{path.name}  tree {shape}  threshold {threshold if threshold is not None else 'default'}")
                print(bench.format_table(summary))
                results.append({"bundle": str(path), "tree": tree, "training": training, "summary": summary,
                                "rows": [r.__dict__ for r in rows]})
    curve = tau_curve(results)
    if curve:
        print("\ntraining tokens -> held-out agreement (1 level), tau (greedy, speculative, 24 prompts)")
        for point in curve:
            print(f"  {point['train_tokens']:>9,}  {point['agreement']:.1%}  tau {point['tau']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results, "curve": curve}, indent=2))
    if args.plot and curve:
        plot_curve(curve, args.plot)


def tau_curve(results: list[dict]) -> list[dict]:
    """One point per trained bundle: training tokens, held-out agreement, greedy speculative tau (first shape)."""
    points = {}
    for result in results:
        training = result["training"]
        if not training or result["bundle"] in points:
            continue
        greedy = [s for s in result["summary"] if s["mode"] == "speculative" and s["temperature"] == 0]
        if greedy:
            points[result["bundle"]] = {"bundle": result["bundle"], "train_tokens": training["train_tokens"],
                                        "agreement": training["held_out_agreement"][0], "tau": greedy[0]["tau"],
                                        "speedup": greedy[0]["speedup"]}
    return sorted(points.values(), key=lambda p: p["train_tokens"])


def plot_curve(curve: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    tokens = [p["train_tokens"] / 1000 for p in curve]
    ax.plot(tokens, [p["tau"] for p in curve], "o-", label="tau (greedy, speculative)")
    ax.plot(tokens, [p["speedup"] for p in curve], "s--", label="speed-up vs plain")
    ax.set_xlabel("training tokens (thousands)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M feature draft, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

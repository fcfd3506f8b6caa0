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

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import speculative  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def main() -> None:
    p = speculative.parser(__doc__)
    p.set_defaults(modes="speculative,staged")
    p.add_argument("--plot", type=Path, default=None, help="tau vs training tokens, one point per bundle")
    p.add_argument("--curve-only", action="store_true",
                   help="no decoding runs: the curve from each bundle's training record (held-out agreement, tau)")
    args = p.parse_args()
    results = [] if args.curve_only else speculative.measure(args)
    curve = recorded_curve(args.bundle) if args.curve_only else tau_curve(results)
    if curve:
        print("\ntraining tokens -> held-out agreement (1 level), tau and speed-up (greedy, speculative)")
        for point in curve:
            speedup = f"{point['speedup']:.2f}x" if point["speedup"] is not None else ""
            print(f"  {point['train_tokens']:>9,}  {point['agreement']:.1%}  tau {point['tau']:.2f}  {speedup}")
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


def recorded_curve(bundles: list[Path]) -> list[dict]:
    """One point per bundle from what train-draft recorded: training tokens, held-out agreement per depth, tau of
    its held-out greedy decode."""
    points = []
    for path in bundles:
        training = json.loads((path / "manifest.json").read_text())["draft"]["training"]
        points.append({"bundle": str(path), "train_tokens": training["train_tokens"],
                       "agreement": training["held_out_agreement"][0], "agreement_all": training["held_out_agreement"],
                       "tau": training["held_out_tau"], "speedup": None,
                       "minutes": round(training.get("total_seconds", 0) / 60, 1)})
    return sorted(points, key=lambda p: p["train_tokens"])


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
    if all(p["speedup"] is not None for p in curve):
        ax.plot(tokens, [p["speedup"] for p in curve], "s--", label="speed-up vs plain")
    ax.plot(tokens, [1 + p["agreement"] for p in curve], "^:", label="1 + held-out agreement (1 level)")
    ax.set_xscale("log")  # each doubling of the data one step
    ax.set_xticks(tokens, [f"{t:.0f}" for t in tokens])
    ax.minorticks_off()
    ax.set_xlabel("training tokens (thousands, log scale)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M feature draft, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

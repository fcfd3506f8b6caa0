"""Per family: graph nodes per layer, and the one-token step and a 16-node tree pass relative to llama's, for
same-sized random models (the tiny test configs of tests/tiny_models.FAMILIES at --hidden/--layers), in one run.

    python benchmarks/families.py [--hidden 256] [--layers 4] [--repeats 200] [--threads 2] [--json out.json]

Step times are medians over --repeats passes, the families interleaved round by round (a slow minute hits all of
them alike), after a past of 64 rows; every session uses --threads intra-op threads that do not spin while idle (with
ten sessions taking turns, spinning pools of the others distorted the tree passes 2-3x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median  # noqa: E402
from specx.exporter.pipeline import ExportRequest, export_bundle  # noqa: E402
from specx.runtime.decoding import feed  # noqa: E402
from specx.runtime.bundle import Bundle  # noqa: E402
from specx.runtime.generator import _decoder  # noqa: E402
from specx.runtime.manifest import Manifest  # noqa: E402
from specx.runtime.tree import build_tree, chain  # noqa: E402
from tests import tiny_models  # noqa: E402

PAST = 64
TREE = 16
BASELINE = "llama"


def nodes_per_layer(graph: Path, layers: int) -> tuple[float, int]:
    """(nodes per decoder layer, graph-level nodes)."""
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    per_layer = Counter(n.name.split("/")[2] for n in nodes if n.name.startswith("/model/layers."))
    in_layers = sum(per_layer.values())
    return in_layers / layers, len(nodes) - in_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = {BASELINE: ("llama", {}), **tiny_models.FAMILIES}
    tiny_models.FAMILIES.setdefault(BASELINE, ("llama", {}))
    work = Path(tempfile.mkdtemp(prefix="specx-families-"))
    sessions, rows = {}, {}
    for name in variants:
        sizes = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=8, num_key_value_heads=4)
        if name == "llama-hd12":
            sizes.update(hidden_size=96, intermediate_size=384)  # head_dim 12 needs hidden = 8 x 12
        if name == "phi3":  # longrope factors: one per rotated frequency (head_dim 32 x 0.5 / 2)
            rotary_pairs = args.hidden // 8 // 4
            sizes["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0] * rotary_pairs,
                                     "long_factor": [4.0] * rotary_pairs}
        src = tiny_models.save_family(work / f"hf-{name}", name, **sizes)
        bundle = export_bundle(ExportRequest(str(src), draft="none", output=work / name, dtype="fp32",
                                             ngram_tokens=0))
        # sessions take turns: idle thread pools must not spin through the next family's passes
        session = _decoder(Bundle.load(bundle), Manifest.read(bundle).target, "cpu", args.threads, spinning=False)
        session.reserve(PAST + TREE + 1)
        per_layer, graph_level = nodes_per_layer(bundle / "target.onnx", args.layers)
        sessions[name], rows[name] = session, {"nodes_per_layer": per_layer, "graph_nodes": graph_level,
                                               "step_ms": [], "tree_ms": []}
    rng = np.random.default_rng(0)
    step, tree = chain(1), build_tree([-1] + [int(rng.integers(0, i)) for i in range(1, TREE)])
    for _ in range(args.repeats):
        for name, session in sessions.items():
            session.reset()
            feed(session, rng.integers(0, tiny_models.VOCAB, PAST).astype(np.int64))
            for key, shape in (("step_ms", step), ("tree_ms", tree)):
                ids = rng.integers(0, tiny_models.VOCAB, (1, shape.size)).astype(np.int64)
                start = time.perf_counter()
                session.forward(ids, shape.positions(PAST), shape.attention_mask(PAST))
                rows[name][key].append(1e3 * (time.perf_counter() - start))
    base = median(rows[BASELINE]["step_ms"])
    print(f"{'family':14s} {'nodes/layer':>11s} {'graph':>5s} {'step ms':>8s} {'vs llama':>8s} {'16-node':>8s} {'/step':>6s}")
    summary = {}
    for name, r in rows.items():
        s, t = median(r["step_ms"]), median(r["tree_ms"])
        summary[name] = {"nodes_per_layer": r["nodes_per_layer"], "graph_nodes": r["graph_nodes"], "step_ms": s,
                         "step_vs_llama": s / base, "tree16_ms": t, "tree16_vs_step": t / s}
        print(f"{name:14s} {r['nodes_per_layer']:11.1f} {r['graph_nodes']:5d} {s:8.3f} {s / base:8.2f} {t:8.3f} "
              f"{t / s:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "families": summary}, indent=2))


if __name__ == "__main__":
    main()

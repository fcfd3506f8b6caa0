"""train-draft's two teachers side by side on this machine: the PyTorch source (train-draft's copy at the
fastest precision, batched) and the bundle's own target graph (`--teacher graph`: ONNX Runtime, the bundle's
dtype), each writing the same shards of text and labelling them.

    python benchmarks/teacher_rates.py --bundle DIR [--texts 64] [--kinds opening,free] [--rounds 2] [--threads 2]
                                       [--work DIR]

Per round, per kind, one shard of ``--texts`` texts (train-draft's default shard holds 128; its texts are 256
tokens, prompts included), written by each teacher in turn (source, then graph, alternating the order each round),
then labelled by each; tokens/s are medians over rounds. The graph teacher is exported into ``--work`` once.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from specx.drafttrain.data import ProgressBar, TextShard, distill, write_text_shard  # noqa: E402
from specx.drafttrain.phases import target_fingerprint  # noqa: E402
from specx.drafttrain.precision import fast_dtype, in_precision  # noqa: E402
from specx.drafttrain.teacher import GraphTeacher, GraphWriter, TeacherGraph, teacher_graph  # noqa: E402
from specx.drafttrain.train import default_feature_layers  # noqa: E402
from specx.exporter.adapters import adapter_for  # noqa: E402
from specx.exporter.sources import load_source  # noqa: E402
from specx.runtime.bundle import Bundle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--kinds", default="opening,free")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("teacher-rates-work"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = Bundle.load(args.bundle).manifest
    loaded = load_source(manifest.target.source, "fp32")
    adapter = adapter_for(loaded.model.config)
    layers = default_feature_layers(adapter.spec.num_layers)
    root, entry = teacher_graph(args.work, manifest, loaded, adapter, layers,
                                target_fingerprint(loaded.model, loaded.tokenizer), lambda _: contextlib.nullcontext())
    dtype = fast_dtype("cpu")
    source = in_precision(loaded.model, dtype)
    graph = TeacherGraph(root, entry, "cpu", args.threads)
    writers = {"source": source, "graph": GraphWriter(graph, loaded.model.config)}
    labellers = {"source": lambda texts: distill(source, texts, layers),
                 "graph": lambda texts: GraphTeacher(graph).label(texts, ProgressBar())}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(writers) if round_ % 2 == 0 else list(writers)[::-1]
        for index, kind in enumerate(args.kinds.split(",")):
            shard = TextShard(index, kind, args.texts, greedy=kind != "free" and index % 2 == 1)
            written = {}
            for name in order:
                start = time.perf_counter()
                written[name] = write_text_shard(writers[name], loaded.tokenizer, shard, seed=round_)
                tokens = sum(t.size for t in written[name])
                rates.setdefault((f"writing {kind}", name), []).append(tokens / (time.perf_counter() - start))
            for name in order:
                start = time.perf_counter()
                labelled = labellers[name](written["source"])
                rates.setdefault(("labelling", name), []).append(labelled.num_tokens / (time.perf_counter() - start))
    print(f"machine {machine()}; {manifest.dtype} bundle {args.bundle.name}; source at {dtype}; graph "
          f"{entry.graph}; {args.threads} threads; {args.texts} texts a shard; {args.rounds} rounds (medians)")
    for (phase, name), values in rates.items():
        print(f"  {phase:18s} {name:7s} {statistics.median(values):8.1f} tokens/s   "
              f"rounds: {' '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()

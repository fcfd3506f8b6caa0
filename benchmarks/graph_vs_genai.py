"""specx's target graph against onnxruntime-genai's model of the same checkpoint, each in a bare ONNX Runtime loop:
the one-token step (and specx's chain passes) with nothing around the graph, so that what remains between
`specx bench --against onnxruntime-genai`'s two figures is the loops, not the graphs.

    python benchmarks/graph_vs_genai.py --genai DIR --bundle smol-int4 [--bundle other ...] [--past 100]
                                        [--rows 1,2,4] [--rounds 4] [--passes 200] [--threads 2]

DIR: the folder of genai's model.onnx (`specx bench --against onnxruntime-genai` builds and caches it under
$SPECX_PEERS/genai-models/). Each graph runs on static caches shared by past and present (what both runtimes
bind), a random past of ``--past`` rows, threads spinning as decoding runs them. Every (graph, rows) runs in a
process of its own (spinning pools of two sessions in one process hold each other's cores), the processes in
turn for ``--rounds`` rounds (this machine's speed drifts: alternating spreads the drift); each prints the median
of ``--passes`` passes after a warm-up, and the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median  # noqa: E402
from specx.runtime.bundle import Bundle  # noqa: E402
from specx.runtime.session import default_session_options  # noqa: E402
from specx.runtime.tree import chain  # noqa: E402

CAPACITY = 512
TOKEN = 42
WARMUP = 30


class BareRunner:
    """One graph, its caches bound as past and present, one binding per pass length."""

    def __init__(self, path: Path, layers: int, kv_shape: tuple[int, ...], threads: int):
        self.session = ort.InferenceSession(str(path), default_session_options(threads),
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(kv_shape).astype(np.float32))
                      for _ in range(2 * layers)]  # (batch, kv_heads, capacity, head_dim)
        self.layers = layers
        self.outputs = {o.name for o in self.session.get_outputs()}

    def binding(self, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
        io = self.session.io_binding()
        for i in range(self.layers):
            for k, kind in enumerate(("key", "value")):
                value = self.cache[2 * i + k]
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                io.bind_ortvalue_output(f"present.{i}.{kind}", value)
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        io.bind_output("next_tokens" if "next_tokens" in self.outputs else "logits")  # what each loop reads
        return io


def specx_feeds(past: int, rows: int) -> dict[str, np.ndarray]:
    run = chain(rows)
    return {"input_ids": np.full((1, rows), TOKEN, np.int64), "position_ids": run.positions(past),
            "tree_mask": run.attention_mask(past)}


def genai_feeds(past: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((1, 1), TOKEN, np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}


def worker(kind: str, path: Path, rows: int, past: int, passes: int, threads: int, cache: list[int]) -> None:
    """One process: one graph's passes of ``rows`` rows; prints the median milliseconds. ``cache``: layers, KV
    heads, head size (the specx contract's: genai's graph leaves the head size symbolic)."""
    layers, kv_heads, head_dim = cache
    runner = BareRunner(path, layers, (1, kv_heads, CAPACITY, head_dim), threads)
    io = runner.binding(genai_feeds(past) if kind == "genai" else specx_feeds(past, rows))
    for _ in range(WARMUP):
        runner.session.run_with_iobinding(io)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        runner.session.run_with_iobinding(io)
        times.append(1e3 * (time.perf_counter() - start))
    print(json.dumps({"ms": median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--genai", type=Path, help="the folder of genai's model.onnx")
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--rows", default="1", help="specx pass lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "GRAPH", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, graph, rows = args.worker
        worker(kind, Path(graph), int(rows), args.past, args.passes, args.threads, args.cache)
        return
    if not args.bundle or args.genai is None:
        parser.error("give --genai and at least one --bundle")
    contract = Bundle.load(args.bundle[0]).manifest.target.contract
    cache = [str(n) for n in (contract.num_layers, contract.num_kv_heads, contract.head_dim)]
    runs = {"genai, 1 row": ("genai", args.genai / "model.onnx", 1)}
    for bundle in args.bundle:
        target = Bundle.load(bundle).manifest.target
        for rows in (int(r) for r in args.rows.split(",")):
            runs[f"{bundle.name}, {rows} row{'s' if rows > 1 else ''}"] = ("specx", bundle / target.graph, rows)
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, (kind, graph, rows) in runs.items():
            out = subprocess.run([sys.executable, __file__, "--worker", kind, str(graph), str(rows),
                                  "--past", str(args.past), "--passes", str(args.passes),
                                  "--threads", str(args.threads), "--cache", *cache],
                                 check=True, capture_output=True, text=True)
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    print(f"machine {machine()}; threads {args.threads}; past {args.past}; {args.rounds} rounds of "
          f"{args.passes} passes, a process each")
    base = median(times["genai, 1 row"])
    for name, values in times.items():
        print(f"  {name:32s} {median(values):7.3f} ms  ({median(values) / base:4.2f}x genai's step)  "
              f"rounds: {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()

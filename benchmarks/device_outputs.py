"""What bringing back only each row's argmax (``next_tokens``, computed in the graph) saves against copying the
logits and taking numpy's argmax, on the same graph, in one run: a one-token step and an 8-node verify pass.

    python benchmarks/device_outputs.py --bundle DIR [--repeats 300] [--threads 2]

The two ways alternate pass by pass; medians over --repeats; after a 100-token past.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median  # noqa: E402
from specx.runtime import Generator  # noqa: E402
from specx.runtime.decoding import feed  # noqa: E402
from specx.runtime.tree import build_tree, chain  # noqa: E402

PAST = 100
TREE = [-1, 0, 0, 1, 1, 2, 3, 4]  # 8 nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    session = Generator.load(args.bundle, provider="cpu", threads=args.threads).target
    if not session.contract.has_next_tokens:
        raise SystemExit("this bundle's graph has no next_tokens output: re-export it")
    session.reserve(PAST + len(TREE) + 1)
    rng = np.random.default_rng(0)
    feed(session, rng.integers(0, session.contract.vocab_size, PAST).astype(np.int64))

    def logits_way(ids, pos, mask):
        return np.argmax(session.forward(ids, pos, mask), axis=-1)

    ways = {"logits + numpy argmax": logits_way, "next_tokens": session.forward_tokens}
    times = {(way, shape): [] for way in ways for shape in ("step", "tree8")}
    shapes = {"step": chain(1), "tree8": build_tree(TREE)}
    for _ in range(args.repeats):
        for shape_name, tree in shapes.items():
            ids = rng.integers(0, session.contract.vocab_size, (1, tree.size)).astype(np.int64)
            pos, mask = tree.positions(PAST), tree.attention_mask(PAST)
            for way, run in ways.items():
                start = time.perf_counter()
                run(ids, pos, mask)  # not committed: the next pass overwrites the same rows
                times[(way, shape_name)].append(1e3 * (time.perf_counter() - start))
    print(f"machine: {machine()}  bundle: {args.bundle.name}  threads {args.threads}  repeats {args.repeats}")
    for shape_name in shapes:
        base = median(times[("logits + numpy argmax", shape_name)])
        for way in ways:
            m = median(times[(way, shape_name)])
            print(f"{shape_name:6s} {way:24s} {m:8.3f} ms  {m / base:5.3f}x")


if __name__ == "__main__":
    main()

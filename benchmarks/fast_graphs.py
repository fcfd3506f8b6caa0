"""Fast-graph figures, measured in one run: a decode step against its bandwidth floor, a tree pass against a
one-token step, the step at a long context against a short one, and autoregressive tokens/s of specx bundles side by
side with onnxruntime-genai builds of the same model.

    python benchmarks/fast_graphs.py --bundle DIR [--bundle DIR ...] [--genai DIR ...] [--prompts 24]
                                     [--new-tokens 128] [--json out.json]

--bundle: specx bundles (e.g. fp32 and int4 exports of SmolLM2-135M-Instruct); step figures for each (the bandwidth
floor streams the bundle's own weight bytes as fp32: the fp32 floor). --genai: onnxruntime-genai model folders (benchmarks/peers/setup-genai.sh builds them; decoded by
benchmarks/peers/genai_decode.py in the peers' own venv, --genai-python). Every session uses --threads intra-op
threads (default 2). Step figures: medians of --repeats timings after --warmup untimed ones. Tokens/s: --rounds
rounds, each running every specx bundle and every peer over all prompts in turn; the figure is the median of the
rounds' medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PROMPTS, load_prompts, machine, median, timed  # noqa: E402
from specx.runtime import Generator  # noqa: E402
from specx.runtime.decoding import feed  # noqa: E402
from specx.runtime.tree import build_tree  # noqa: E402

SHORT_CONTEXT = 150
LONG_CONTEXT = 2000
TREE_NODES = 16
PREFILL_CHUNK = 500
GENAI_PYTHON = Path(os.environ.get("SPECX_PEERS", Path.home() / ".cache" / "specx-peers")) / "genai-venv/bin/python"


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def bandwidth_floor(weight_bytes: int, hidden: int, threads: int, warmup: int, repeats: int) -> float:
    """Seconds for one ORT MatMul (1 x hidden) @ (hidden x N) streaming ``weight_bytes`` of fp32 weights."""
    columns = weight_bytes // (4 * hidden)
    weight = np.random.default_rng(0).standard_normal((hidden, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "floor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, columns])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    x = np.ones((1, hidden), np.float32)
    return timed(lambda: session.run(None, {"x": x}), warmup, repeats)


def step_figures(gen: Generator, warmup: int, repeats: int) -> dict:
    """One-token step at ~150 and ~2,000 cached tokens, a 16-node tree pass at ~150 (target graph, IO binding)."""
    target = gen.target
    vocab = target.contract.vocab_size
    rng = np.random.default_rng(0)
    one = np.array([7], dtype=np.int64)

    def fill(context: int) -> None:
        target.reset()
        target.reserve(LONG_CONTEXT + 64)
        for start in range(0, context, PREFILL_CHUNK):
            feed(target, rng.integers(0, vocab, min(PREFILL_CHUNK, context - start)))

    def step() -> None:  # a one-token pass, not committed: the context stays put
        past = target.past_len
        target.forward(one[None], np.array([[past]]), np.ones((1, 1, 1, past + 1), dtype=bool))

    parents = [-1] + [int(rng.integers(max(0, i - 3), i)) for i in range(1, TREE_NODES)]
    tree = build_tree(parents)
    tokens = rng.integers(0, vocab, tree.size)[None]

    def tree_pass() -> None:
        target.forward(tokens, tree.positions(target.past_len), tree.attention_mask(target.past_len))

    fill(SHORT_CONTEXT)
    short = timed(step, warmup, repeats)
    tree_time = timed(tree_pass, warmup, repeats)
    fill(LONG_CONTEXT)
    long = timed(step, warmup, repeats)
    return {"step_ms_at_150": short * 1e3, "tree16_ms_at_150": tree_time * 1e3, "step_ms_at_2000": long * 1e3,
            "tree16_over_step": tree_time / short, "step_2000_over_150": long / short}


def specx_tokens_per_second(gen: Generator, prompts: list[dict], new_tokens: int) -> dict:
    gen.generate(prompts[0]["prompt"], max_new_tokens=8, ignore_eos=True, mode="autoregressive")  # warm-up
    rows = []
    for prompt in prompts:
        result = gen.generate(prompt["prompt"], max_new_tokens=new_tokens, ignore_eos=True, mode="autoregressive")
        rows.append({"id": prompt["id"], "kind": prompt["kind"], "tokens_per_second": result.stats.tokens_per_second,
                     "tokens": result.tokens})
    return {"median_tokens_per_second": median([r["tokens_per_second"] for r in rows]), "prompts": rows}


def genai_tokens_per_second(model: Path, python: Path, prompts: int, new_tokens: int, threads: int) -> dict:
    script = Path(__file__).resolve().parent / "peers" / "genai_decode.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "genai.json"
        subprocess.run([str(python), str(script), "--model", str(model), "--prompts", str(PROMPTS),
                        "--new-tokens", str(new_tokens), "--threads", str(threads), "--repeats", "1",
                        "--limit", str(prompts), "--json", str(out)], check=True)
        data = json.loads(out.read_text())
    rates = [p["tokens_per_second"] for p in data["prompts"]]
    return {"median_tokens_per_second": median(rates), "version": data.get("version"), "prompts": data["prompts"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True)
    parser.add_argument("--genai", type=Path, action="append", default=[])
    parser.add_argument("--genai-python", type=Path, default=GENAI_PYTHON)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-steps", action="store_true", help="only tokens/s")
    parser.add_argument("--rounds", type=int, default=2, help="tokens/s rounds, alternating every runner")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)
    report: dict = {"machine": {**machine(), "threads": args.threads}, "prompts": len(prompts),
                    "new_tokens": args.new_tokens, "rounds": args.rounds, "bundles": {}, "peers": {}}
    generators = {bundle: Generator.load(bundle, provider="cpu", threads=args.threads) for bundle in args.bundle}
    for bundle, gen in generators.items():
        entry = gen.bundle.manifest.target
        figures: dict = {"dtype": gen.bundle.manifest.dtype, "weight_bytes": entry.weight_bytes, "rounds": []}
        if not args.skip_steps:
            floor = bandwidth_floor(entry.weight_bytes, entry.architecture.hidden_size, args.threads, args.warmup,
                                    args.repeats)
            figures.update(step_figures(gen, args.warmup, args.repeats), floor_ms=floor * 1e3)
            figures["step_over_floor"] = figures["step_ms_at_150"] / figures["floor_ms"]
            print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}), flush=True)
        report["bundles"][str(bundle)] = figures
    for model in args.genai:
        report["peers"][str(model)] = {"rounds": []}
    # Rounds alternate every runner over all prompts, so drift on a shared machine reaches each of them alike.
    for round_ in range(args.rounds):
        for bundle, gen in generators.items():
            result = specx_tokens_per_second(gen, prompts, args.new_tokens)
            report["bundles"][str(bundle)]["rounds"].append(result)
            print(f"round {round_}: specx {bundle.name}: {result['median_tokens_per_second']:.1f} tokens/s", flush=True)
        for model in args.genai:
            peer = genai_tokens_per_second(model, args.genai_python, len(prompts), args.new_tokens, args.threads)
            report["peers"][str(model)]["rounds"].append(peer)
            print(f"round {round_}: onnxruntime-genai {model.name}: {peer['median_tokens_per_second']:.1f} tokens/s",
                  flush=True)
    for runner in [*report["bundles"].values(), *report["peers"].values()]:
        runner["median_tokens_per_second"] = median([r["median_tokens_per_second"] for r in runner["rounds"]])
    summary = {name: {k: v for k, v in fig.items() if k != "rounds"} for name, fig in report["bundles"].items()}
    summary.update({name: {"median_tokens_per_second": p["median_tokens_per_second"]} for name, p in report["peers"].items()})
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

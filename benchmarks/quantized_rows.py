"""Where a multi-row pass costs on quantized weights: the target graph of a model quantized several ways, each pass of
1, 4 and 16 rows timed against its own one-row step, in one run (the variants interleaved pass by pass).

    python benchmarks/quantized_rows.py SOURCE [--variants int4-b32,int4-b128,...] [--repeats 40] [--threads 2]
                                        [--profile]

SOURCE: what `specx export` takes (SmolLM2's GGUF: ../shared/bench/get-smollm2.sh). Variants:
    int{4,8}-b{32,64,128,256}[-l{0,4}][-chains|-rowpad][-head{fp32,8,q8}]
                                         MatMulNBits, block size, accuracy level (default 4); -chains: padded as
                                         export pads them at accuracy 4 (exact chains: a dummy attention row in the
                                         graph where MatMulNBits computes rows alike, whole passes padded by the
                                         runtime elsewhere); -rowpad: one-row passes padded by the runtime to two
                                         rows whatever the block (what export did before the attention row)
    q8row, q7row                         int8 (7-bit for q7row) weights (per column) x int8 activations quantized per
                                         row in the graph
                                         (ReduceMax -> Div, Round, +128, Cast uint8 -> MatMulIntegerToFloat -> Mul):
                                         MLAS's U8S8 QGEMM,
                                         each row's result independent of the others (exact for speculation)
    fp32                                 the float graph
Passes run through the runtime's own DecoderSession (IO binding, static cache); sessions do not spin while idle (they
take turns). Also printed: how far each variant's 8-token pass lies from the same tokens fed one at a time (a target
whose passes are not exact cannot speculate losslessly). --profile adds ONNX Runtime's per-op-type totals for the 1-
and 16-row passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median  # noqa: E402
from specx.runtime.tree import chain  # noqa: E402

PAST = 100
CAPACITY = 256
ROWS = (1, 4, 16)
INT8_MAX = 127.0
INT7_MAX = 63.0  # q7row: weights in [-63, 63]


def build_float_graphs(source: str, work: Path, padded: bool) -> tuple[dict[bool, Path], dict]:
    """The fp32 target graph with its own lm_head (quantizable), its rotary tables one row longer (what padded
    passes need); where ``padded`` (an in-graph -chains variant is asked for), once more with the dummy attention
    row (``padded_attention``)."""
    from specx.exporter.adapters import adapter_for
    from specx.exporter.onnx_export import export_decoder
    from specx.exporter.sources import load_source
    from specx.graphs.contract import EXACT_MIN_ROWS

    loaded = load_source(source, "fp32")
    adapter = adapter_for(loaded.model.config)
    paths = {False: work / "fp32.onnx"}
    contract = export_decoder(adapter, loaded.model, paths[False], "float32", head="own", min_rows=EXACT_MIN_ROWS)
    if padded:
        paths[True] = work / "fp32-attnpad.onnx"
        export_decoder(adapter, loaded.model, paths[True], "float32", head="own", padded_attention=True)
    return paths, contract.to_dict()


def in_graph_padding(name: str) -> bool:
    """Whether a variant runs the graph with the dummy attention row (-chains where MatMulNBits computes rows
    alike, as export chooses)."""
    from specx.exporter.pipeline import pairs_rows

    parts = name.split("-")
    if "chains" not in parts:
        return False
    return not pairs_rows(int(parts[0][3:]), int(parts[1][1:]))


def variant_contract(name: str, contract: dict) -> dict:
    """The contract a variant runs with: -chains pads as export does for its bits and block, -rowpad pads one-row
    passes in the runtime; others not."""
    from specx.graphs.contract import EXACT_MIN_ROWS, EXACT_ROW_MULTIPLE

    plain = {**contract, "min_rows": 1, "row_multiple": 1, "padded_attention": False}
    if "rowpad" in name.split("-"):
        return {**plain, "min_rows": EXACT_MIN_ROWS}
    if "chains" not in name.split("-"):
        return plain
    if in_graph_padding(name):
        return {**plain, "padded_attention": True}
    return {**plain, "min_rows": EXACT_MIN_ROWS, "row_multiple": EXACT_ROW_MULTIPLE}


LM_HEAD = "/lm_head/MatMul"
HEADS = ("headfp32", "head8", "headq8")  # the lm_head in another precision or kernel than the layers


def matmulnbits(src: Path, dst: Path, bits: int, block: int, level: int, head: str | None = None) -> None:
    """Every MatMul to MatMulNBits; ``head`` (one of HEADS) treats the lm_head otherwise."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=level,
                                     nodes_to_exclude=[LM_HEAD] if head else None)
    quantizer.process()
    model = quantizer.model.model
    if head == "head8":
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block, is_symmetric=True, accuracy_level=level,
                                         nodes_to_include=[LM_HEAD])
        quantizer.process()
        model = quantizer.model.model
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    if head == "headq8":
        q8row(dst, dst, only=LM_HEAD)


def q8row(src: Path, dst: Path, weight_max: float = INT8_MAX, only: str | None = None) -> None:
    """Every MatMul with a 2-D weight (or the one named ``only``) -> per-row int8 activations x per-column int8
    weights (MLAS QGEMM). ``weight_max`` 63: 7-bit weights, so no pair of u8 x s8 products can saturate a 16-bit sum
    in the kernel."""
    model = onnx.load(str(src))
    weights = {i.name: i for i in model.graph.initializer}
    nodes, added = [], []
    added += [numpy_helper.from_array(np.array(INT8_MAX, np.float32), "q8/127"),
              numpy_helper.from_array(np.array([-1], np.int64), "q8/last"),
              numpy_helper.from_array(np.array(1.0, np.float32), "q8/one"),
              numpy_helper.from_array(np.array(1e-30, np.float32), "q8/tiny"),
              numpy_helper.from_array(np.array(128.0, np.float32), "q8/128"),
              numpy_helper.from_array(np.array(128, np.uint8), "q8/z128")]
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or (only and node.name != only):
            nodes.append(node)
            continue
        p, x = node.name, node.input[0]
        array = numpy_helper.to_array(w).astype(np.float32)  # (K, N)
        scale = np.maximum(np.abs(array).max(axis=0), 1e-12) / weight_max  # (N,)
        added += [numpy_helper.from_array(np.round(array / scale).astype(np.int8), f"{p}/q8w"),
                  numpy_helper.from_array(scale.astype(np.float32), f"{p}/q8s")]
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/q8/Abs"),
            helper.make_node("ReduceMax", [f"{p}/abs", "q8/last"], [f"{p}/max"], name=f"{p}/q8/ReduceMax", keepdims=1),
            helper.make_node("Max", [f"{p}/max", "q8/tiny"], [f"{p}/maxp"], name=f"{p}/q8/Max"),
            helper.make_node("Div", [f"{p}/maxp", "q8/127"], [f"{p}/rs"], name=f"{p}/q8/Div"),  # (.., rows, 1)
            # uint8 activations with zero point 128: MLAS's U8S8 kernels (int8 x int8 measured ~10x slower)
            helper.make_node("Div", [x, f"{p}/rs"], [f"{p}/xs"], name=f"{p}/q8/Div_1"),
            helper.make_node("Round", [f"{p}/xs"], [f"{p}/xr"], name=f"{p}/q8/Round"),
            helper.make_node("Add", [f"{p}/xr", "q8/128"], [f"{p}/xa"], name=f"{p}/q8/Add"),
            helper.make_node("Cast", [f"{p}/xa"], [f"{p}/xq"], name=f"{p}/q8/Cast", to=TensorProto.UINT8),
            helper.make_node("MatMulIntegerToFloat", [f"{p}/xq", f"{p}/q8w", "q8/one", f"{p}/q8s", "q8/z128"],
                             [f"{p}/y"], name=f"{p}/q8/MatMulIntegerToFloat", domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}/y", f"{p}/rs"], list(node.output), name=f"{p}/q8/Mul"),
        ]
        del weights[node.input[1]]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [i for i in model.graph.initializer if i.name in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def make_variant(name: str, fp32: Path, work: Path) -> Path:
    if name == "fp32":
        return fp32
    dst = work / f"{name}.onnx"
    if name in ("q8row", "q7row"):
        q8row(fp32, dst, INT8_MAX if name == "q8row" else INT7_MAX)
        return dst
    parts = [p for p in name.split("-") if p not in ("chains", "rowpad") + HEADS]  # int4-b32[-l4][-chains][-head*]
    bits, block = int(parts[0][3:]), int(parts[1][1:])
    level = int(parts[2][1:]) if len(parts) > 2 else 4
    matmulnbits(fp32, dst, bits, block, level, next((p for p in name.split("-") if p in HEADS), None))
    return dst


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    from specx.runtime.session import default_session_options

    options = default_session_options(threads, spinning=False)  # interleaved sessions: idle pools must not spin
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decoder(path: Path, fp32: Path, contract: dict, threads: int):
    """The runtime's DecoderSession over ``path`` (IO binding, static cache) with a committed past of PAST rows."""
    from specx.graphs.contract import GraphContract
    from specx.runtime.decoding import feed
    from specx.runtime.session import DecoderSession, Placement

    c = GraphContract.from_dict(contract)
    committer = ort.InferenceSession(str(fp32.with_name(fp32.stem + ".kv_commit.onnx")),
                                     providers=["CPUExecutionProvider"])
    d = DecoderSession(session(path, threads), committer, c, Placement("cpu", "cpu"))
    d.reserve(CAPACITY)
    feed(d, np.random.default_rng(1).integers(0, c.vocab_size, PAST).astype(np.int64))
    return d


def rows_vs_steps(d, rng: np.random.Generator, rows: int = 8, samples: int = 4) -> float:
    """Max |logit| difference between ``rows``-token passes and the same tokens fed one at a time, over ``samples``
    random token runs (one sample can miss it: a q7row sample once measured 5.7e-6 where others measured 2-3)."""
    return max(_rows_vs_steps(d, rng, rows) for _ in range(samples))


def _rows_vs_steps(d, rng: np.random.Generator, rows: int) -> float:
    tokens = rng.integers(0, d.contract.vocab_size, rows).astype(np.int64)
    past = d.past_len
    single = []
    for token in tokens:
        step = chain(1)
        single.append(d.forward(np.array([[token]]), step.positions(d.past_len), step.attention_mask(d.past_len))[0, 0])
        d.commit()
    d.rewind(past)
    run = chain(rows)
    multi = d.forward(tokens[None], run.positions(past), run.attention_mask(past))[0]
    d.rewind(past)
    return float(max(np.abs(a - b).max() for a, b in zip(single, multi)))


def feeds(contract: dict, rows: int, rng: np.random.Generator) -> dict:
    f = {"input_ids": rng.integers(0, contract["vocab_size"], (1, rows)).astype(np.int64),
         "position_ids": np.arange(PAST, PAST + rows)[None].astype(np.int64),
         "tree_mask": np.tril(np.ones((rows, PAST + rows), bool), k=PAST)[None, None]}
    shape = (1, contract["num_kv_heads"], CAPACITY, contract["head_dim"])
    for spec in contract["inputs"]:
        if spec["name"].startswith("past_key_values"):
            f[spec["name"]] = np.zeros(shape, np.float32)
    return f


def op_profile(path: Path, threads: int, f: dict) -> dict[str, float]:
    s = session(path, threads, profile=True)
    for _ in range(5):
        s.run(["logits"], f)
    trace = s.end_profiling()
    totals: collections.Counter = collections.Counter()
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            head = event["name"].startswith("/lm_head/")  # the lm_head's nodes apart from the layers'
            totals[("lm_head " if head else "") + event["args"]["op_name"]] += event["dur"] / 5 / 1e3
    os.remove(trace)
    return {op: round(ms, 3) for op, ms in totals.most_common(7)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--variants", default="int4-b32,int4-b128,int8-b32,q8row")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="pass lengths, comma-separated (1 first)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="specx-qrows-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    rows_list = tuple(int(r) for r in args.rows.split(","))
    graphs, contract = build_float_graphs(args.source, work, any(in_graph_padding(name) for name in names))
    paths = {name: make_variant(name, graphs[in_graph_padding(name)], work) for name in names}
    decoders = {name: decoder(path, graphs[in_graph_padding(name)], variant_contract(name, contract), args.threads)
                for name, path in paths.items()}
    rng = np.random.default_rng(0)
    passes = {rows: chain(rows) for rows in rows_list}
    times = collections.defaultdict(list)
    for round_ in range(args.repeats + 1):  # the first round warms up
        for name, d in decoders.items():
            for rows, tree in passes.items():
                ids = rng.integers(0, contract["vocab_size"], (1, rows)).astype(np.int64)
                start = time.perf_counter()
                d.forward_tokens(ids, tree.positions(PAST), tree.attention_mask(PAST))  # the runtime's own path
                if round_:
                    times[(name, rows)].append(1e3 * (time.perf_counter() - start))
    print(f"machine {machine()}; threads {args.threads}; repeats {args.repeats}; past {PAST}; runtime path "
          "(IO binding, static cache, next_tokens)")
    base = median(times[(names[0], 1)])
    print(f"{'variant':18s} " + " ".join(f"{r:>3d} rows ms (x own step)" for r in rows_list) + f"   step vs {names[0]}")
    for name in names:
        step = median(times[(name, 1)])
        cells = " ".join(f"{median(times[(name, r)]):10.2f} ({median(times[(name, r)]) / step:4.2f}x)     "
                         for r in rows_list)
        print(f"{name:18s} {cells} {step / base:6.2f}x")
    print("chain pass vs one-token steps (max |logit diff|, 4 random 8-token chains; 0: exact; float graphs ~1e-5):")
    for name, d in decoders.items():
        print(f"  {name:18s} {rows_vs_steps(d, rng):.2e}")
    if args.profile:
        for name, path in paths.items():
            for rows in (1, 16):
                print(name, rows, "rows:", op_profile(path, args.threads, feeds(contract, rows, rng)))


if __name__ == "__main__":
    main()

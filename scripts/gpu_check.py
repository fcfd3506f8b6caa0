#!/usr/bin/env python3
"""The one-command GPU check (issue 23, section 4). scripts/gpu-check.sh brings onnxruntime-gpu and runs it.

    python scripts/gpu_check.py --provider cuda --out /tmp/gpu-check   # a GPU machine: 5-8 minutes (estimated)
    python scripts/gpu_check.py --provider cpu --smoke --out /tmp/gc   # tiny models on the CPU: seconds (the test)

Nothing is downloaded. Random-weight checkpoints are built on the spot: a SmolLM2-135M-shaped llama and a
gpt2-large-shaped gpt2 (--smoke: two tiny ones), each with a tokenizer trained on the spot and a config vocabulary
larger than it (real checkpoints pad too). specx's exporter makes one bundle per dtype with a derived draft
(self:layers=K); the layers the draft drops are quietened (DEEP_LAYER_SCALE) so that it agrees with the target on
about 60% of tokens, as a useful draft would (a random model's shallow draft agrees on none).

The SmolLM2-shaped model also gets a trained feature draft (TRAINED: its fp16 bundle again, with `train-draft` run
on a tiny budget: random weights teach it little, but its float16 graph, its static shapes and its CUDA-graph
capture run as a real one's would, and its call is timed against a target step).

For each bundle, the device (--provider) against the CPU:
  0. placement: where ONNX Runtime puts each node of the target graph (its verbose log, in a child process): CUDA
     graph capture refuses a graph with compute nodes on the CPU (memcpy nodes);
  1. parity: max |logit diff| on a random tree after a past; the manifest's |ORT - torch| recorded at export; the
     graph's next_tokens against the argmax of its logits;
  2. greedy equality: every mode on the device against plain decoding on the CPU and on the device; padded tree
     passes (Generator.load(pad_trees=True)) and CUDA graphs (Generator.load(cuda_graphs=True), static-shape
     bundles) on against off. Where tokens differ, the reference's logit gap between the two tokens says whether
     it is a near tie (within the dtype's noise: TIE_FACTOR x the device-vs-CPU diff) or a real difference;
  3. speed: tokens/s of plain decoding and each mode (eager, padded, CUDA graphs), the step time of a 1-, 16- and
     64-node pass (argmax or logits brought back), a draft call relative to a one-token target step; medians after
     warm-ups.
The CUDA-graph runs load their own Generator in a child process: a failed capture may take ONNX Runtime down, and
the rest of the report must survive it. Everything lands in OUT/gpu-check.json (rewritten after each bundle); the
exit status is 1 when a check failed, 2 when a module is missing, 3 when CUDA cannot be used (onnxruntime fell back
to the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # specx and tests.tiny_models from this checkout (not pip-installed on GPU machines)
    sys.path.insert(0, str(ROOT))

# -- what the check needs --------------------------------------------------------------------------------------
RUNTIME_MODULES = ("numpy", "onnxruntime", "tokenizers", "jinja2")
EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")
# onnxruntime's MatMulNBitsQuantizer (int4 / int8 dtypes) imports these; without them those dtypes are not run
QUANTIZER_MODULES = ("onnx_ir", "ml_dtypes", "sympy")
OPTIONAL_MODULES = {"optimum": "not needed: the exporter reads transformers' standard config names without it"}
EXIT_FAILED, EXIT_MISSING, EXIT_NO_CUDA = 1, 2, 3

# -- what is checked -------------------------------------------------------------------------------------------
MODES = ("autoregressive", "speculative", "staged", "ngram")
TREE_MODES = MODES[1:]  # the modes with verify passes (padded to buckets, captured as CUDA graphs)
DEEP_LAYER_SCALE = 0.07  # output projections of the layers a self:layers=K draft drops: ~60% draft agreement
TRAINED = "fp16+trained-draft"  # a job: the fp16 bundle with a feature draft trained by train-draft
TRAINED_TOKENS = 2048  # train-draft's budget for it: the graphs and their capture are checked, not the draft
TRAINED_DRAFT_VOCAB = 256
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "c_proj.weight", "c_proj.bias")
LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")
TIE_FACTOR = 2.0  # a differing token is a near tie when the reference's logit gap is within this x the parity diff
CHILD_TIMEOUT_S = 240
DEFAULT_BUDGET_S = 360  # no bundle or child starts after this (a started one runs on: a run ends by ~8 minutes)
LLAMA_SPECIAL = ("<s>", "</s>")
GPT2_SPECIAL = ("<|endoftext|>",)
PROMPT_SEED, CHECK_SEED = 2, 1
WORK_ROOT = Path(tempfile.gettempdir()) / "specx-gpu-check"
# ONNX Runtime's verbose placement report (session_state.cc VerifyEachNodeIsAssignedToAnEp) and memcpy insertion
PLACED = re.compile(r"(?:Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
PLACED_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \(")
MEMCPY = re.compile(r"Add (MemcpyFromHost|MemcpyToHost)")


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # transformers model_type: "llama" | "gpt2"
    config: dict[str, Any]
    draft_layers: int  # the derived draft: self:layers=K
    dtypes: tuple[str, ...]  # in the order they are run (the most important first: a time budget cuts the tail)
    cpu_modes: bool  # every mode on the CPU too (else plain decoding only: the CPU reference of a big model is slow)


@dataclass(frozen=True)
class Settings:
    init_range: float  # weights ~ N(0, init_range): decisive enough that greedy runs vary (0.02 repeats a token)
    prompt_tokens: int
    new_tokens: int  # tokens of each equality run
    timing_tokens: int  # tokens of each timed run
    timing_runs: int
    warmups: int
    parity_past: int
    parity_nodes: int
    step_past: int  # committed rows before the timed passes
    pass_sizes: tuple[int, ...]  # tree buckets, so that the CUDA-graph runs capture them
    step_repeats: int
    tree_budget: int
    tree_depth: int


SMOLLM2 = ModelShape("smollm2-135m-shape", "llama", dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5), draft_layers=4, dtypes=("fp16", TRAINED, "fp16-int4", "bf16", "fp32"), cpu_modes=True)
GPT2_LARGE = ModelShape("gpt2-large-shape", "gpt2", dict(
    vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20), draft_layers=6, dtypes=("fp16",),
    cpu_modes=False)
TINY_LLAMA = ModelShape("tiny-llama", "llama", dict(
    vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=160), draft_layers=1,
    dtypes=("fp32", "fp16", "fp16-int4", TRAINED), cpu_modes=True)
TINY_GPT2 = ModelShape("tiny-gpt2", "gpt2", dict(vocab_size=400, n_positions=160, n_embd=64, n_layer=3, n_head=4),
                       draft_layers=1, dtypes=("fp16",), cpu_modes=True)

GPU_SETTINGS = Settings(init_range=0.1, prompt_tokens=32, new_tokens=48, timing_tokens=64, timing_runs=3, warmups=1,
                        parity_past=32, parity_nodes=16, step_past=256, pass_sizes=(1, 16, 64), step_repeats=20,
                        tree_budget=16, tree_depth=5)
SMOKE_SETTINGS = Settings(init_range=0.3, prompt_tokens=8, new_tokens=16, timing_tokens=16, timing_runs=2, warmups=1,
                          parity_past=7, parity_nodes=9, step_past=16, pass_sizes=(1, 16, 64), step_repeats=3,
                          tree_budget=6, tree_depth=3)


# -- small helpers ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        print(f"[{self.elapsed:6.1f}s] {message}", flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def median_ms(run: Callable[[], object], warmups: int, repeats: int) -> float:
    from benchmarks.common import timed

    return 1e3 * timed(run, warmups, repeats)


def random_tree(nodes: int, rng: np.random.Generator) -> Any:
    from specx.runtime.tree import build_tree

    return build_tree([-1] + [int(rng.integers(0, i)) for i in range(1, nodes)])


def make_prompt(vocab_size: int, settings: Settings) -> list[int]:
    return [int(t) for t in np.random.default_rng(PROMPT_SEED).integers(0, vocab_size, settings.prompt_tokens)]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def run_child(arguments: Sequence[str], timeout: float = CHILD_TIMEOUT_S) -> subprocess.CompletedProcess | str:
    """This script again with ``arguments``; the error text when it times out."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"


def child_json(done: subprocess.CompletedProcess | str) -> dict[str, Any]:
    """The JSON a child printed last, or what went wrong."""
    if isinstance(done, str):
        return {"error": done}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-2:]
        return {"error": f"exit status {done.returncode}: {' | '.join(tail)}"[:600]}
    return json.loads(lines[-1])


# -- preflight -------------------------------------------------------------------------------------------------
def missing(modules: Sequence[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def preflight(provider: str, dtypes: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """What is importable and which dtypes can run; the list holds fatal problems (exit 2)."""
    info: dict[str, Any] = {"python": platform.python_version(),
                            "missing_required": missing(RUNTIME_MODULES + EXPORT_MODULES),
                            "missing_quantizer": missing(QUANTIZER_MODULES), "optional": {}}
    for module, note in OPTIONAL_MODULES.items():
        info["optional"][module] = "present" if importable(module) else f"absent ({note})"
    fatal = [f"python module {m!r} is missing" for m in info["missing_required"]]
    if fatal:
        return info, fatal
    import onnxruntime as ort

    info["onnxruntime"] = {"version": ort.__version__, "path": str(Path(ort.__file__).parent),
                           "available_providers": ort.get_available_providers()}
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        fatal.append(f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} has no CUDAExecutionProvider: "
                     "install onnxruntime-gpu (scripts/gpu-check.sh does, from /tmp/ortparts)")
    info["skipped_dtypes"] = {d: f"needs {', '.join(info['missing_quantizer'])} (onnxruntime's MatMulNBitsQuantizer)"
                              for d in dtypes if "int" in d and info["missing_quantizer"]}
    if provider == "cpu":
        info["skipped_dtypes"].update({d: "runs on CUDA only" for d in dtypes if not cpu_runs(d)})
    info["device"] = device_name(provider)
    return info, fatal


def cpu_runs(dtype: str) -> bool:
    """Whether ONNX Runtime's CPU kernels run bundles of ``dtype`` (bf16: no; its checks then run on the device
    alone, against PyTorch at export and the device's own plain decoding)."""
    from specx.graphs.precision import PRECISIONS

    return dtype not in PRECISIONS or PRECISIONS[dtype].cpu_runs


def device_name(provider: str) -> str:
    if provider != "cuda":
        return platform.processor() or platform.machine()
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "torch sees no CUDA device"


def check_cuda_session(work: Path) -> str:
    """Open a one-node graph with provider="cuda": specx's open_session raises ProviderError when onnxruntime
    falls back to the CPU (a missing CUDA or cuDNN library). Returns the session's providers."""
    import onnx
    from onnx import TensorProto, helper

    from specx.runtime.session import open_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    path = work / "cuda-probe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session, placement = open_session(path, "cuda")
    return f"{placement.name}: {session.get_providers()}"


# -- checkpoints and bundles -----------------------------------------------------------------------------------
def build_checkpoint(shape: ModelShape, settings: Settings, path: Path, seed: int = 0) -> bool:
    """A random-weight checkpoint of ``shape`` with a tokenizer trained on the spot; False when ``path`` holds one
    built with the same shape and settings already (reused)."""
    signature = json.dumps({"shape": asdict(shape), "init_range": settings.init_range, "seed": seed,
                            "scale": DEEP_LAYER_SCALE}, sort_keys=True)
    marker = path / "gpu_check_shape.json"
    if marker.is_file() and marker.read_text() == signature:
        return False
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from tests.tiny_models import train_tokenizer

    special = GPT2_SPECIAL if shape.family == "gpt2" else LLAMA_SPECIAL
    tok = train_tokenizer(list(special))
    bos, eos = tok.token_to_id(special[0]), tok.token_to_id(special[-1])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[-1])
    config = AutoConfig.for_model(shape.family, **shape.config, bos_token_id=bos, eos_token_id=eos,
                                  initializer_range=settings.init_range)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    quieten_deep_layers(model, shape.draft_layers)
    if all(dtype.startswith("fp16") for dtype in shape.dtypes) and TRAINED not in shape.dtypes:  # train-draft: fp32
        model = model.to(torch.float16)  # half the bytes to write and read; every export is float16 anyway
    model.save_pretrained(path)
    fast.save_pretrained(path)
    marker.write_text(signature)
    return True


def quieten_deep_layers(model: Any, keep: int) -> None:
    """Scale the output projections of layers >= ``keep`` by DEEP_LAYER_SCALE: they still change the logits (the
    target is not its draft), as a trained model's later layers refine rather than overturn its early guess."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            match = LAYER_INDEX.search(name)
            if match and int(match.group(1)) >= keep and name.endswith(OUTPUT_PROJECTIONS):
                param.mul_(DEEP_LAYER_SCALE)


@contextlib.contextmanager
def validation_on_cpu() -> Iterator[None]:
    """Export validates float16 graphs on CUDA when torch and onnxruntime see a GPU; a graph that fails that
    validation is exported again validated on the CPU, so that the device checks can still measure it."""
    from specx.exporter import validate

    saved = validate._has_cuda
    validate._has_cuda = lambda: False
    try:
        yield
    finally:
        validate._has_cuda = saved


def export(shape: ModelShape, checkpoint: Path, dtype: str, out: Path, reuse: bool) -> dict[str, Any]:
    from specx.errors import ExportError
    from specx.exporter.pipeline import ExportRequest, export_bundle

    if reuse and (out / "manifest.json").is_file():
        return {"seconds": None, "reused": True}
    request = ExportRequest(str(checkpoint), draft=f"self:layers={shape.draft_layers}", output=out, dtype=dtype,
                            ngram_tokens=0)
    start = time.perf_counter()
    try:
        export_bundle(request)
        return {"seconds": time.perf_counter() - start, "reused": False}
    except ExportError as exc:
        error = first_line(exc)
    with validation_on_cpu():
        export_bundle(request)
    return {"seconds": time.perf_counter() - start, "reused": False, "error": error,
            "note": "exported again validated on the CPU"}


def export_trained(shape: ModelShape, checkpoint: Path, out: Path, reuse: bool) -> dict[str, Any]:
    """The fp16 bundle with a feature draft from `train-draft` (a tiny budget), written to ``out``."""
    from specx.drafttrain.pipeline import TrainDraftRequest, train_draft

    if reuse and (out / "manifest.json").is_file():
        return {"seconds": None, "reused": True}
    result = export(shape, checkpoint, "fp16", out, reuse=False)
    start = time.perf_counter()
    train_draft(TrainDraftRequest(out, tokens=TRAINED_TOKENS, draft_vocab=TRAINED_DRAFT_VOCAB, epochs=1,
                                  cache_data=False), lambda _: contextlib.nullcontext())
    return {**result, "train_draft_seconds": time.perf_counter() - start}


def manifest_parity(bundle: Path) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {role: manifest[role]["parity"] for role in ("target", "draft") if manifest.get(role)}


def is_static(bundle: Path) -> bool:
    """Static-shape graphs (capacity-wide mask, past_length input): what Generator.load(cuda_graphs=True) needs."""
    from specx.runtime.bundle import Bundle

    return Bundle.load(bundle).manifest.target.contract.static_shapes


# -- decoding and timing (parent and CUDA-graph child) ---------------------------------------------------------
def generate(gen: Any, prompt: Sequence[int], settings: Settings, mode: str, tokens: int) -> Any:
    """Greedy decoding of ``tokens`` tokens in ``mode`` through the public API (keyword overrides only)."""
    tree = {} if mode == "autoregressive" else dict(tree_budget=settings.tree_budget, tree_depth=settings.tree_depth,
                                                    tree_threshold=0.0)
    return gen.generate(list(prompt), max_new_tokens=tokens, mode=mode, ignore_eos=True, **tree)


def tokens_by_mode(gen: Any, prompt: Sequence[int], settings: Settings, modes: Sequence[str]) -> dict[str, list[int]]:
    return {mode: generate(gen, prompt, settings, mode, settings.new_tokens).tokens for mode in modes}


def speeds(gen: Any, prompt: Sequence[int], settings: Settings, modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Tokens/s of each mode: medians of ``timing_runs`` after ``warmups``."""
    result = {}
    for mode in modes:
        runs = [generate(gen, prompt, settings, mode, settings.timing_tokens).stats
                for _ in range(settings.warmups + settings.timing_runs)][settings.warmups:]
        result[mode] = {"tokens_per_second": statistics.median(s.tokens_per_second for s in runs),
                        "tokens_per_target_call": statistics.median(s.tokens_per_target_call for s in runs),
                        "runs": [s.tokens_per_second for s in runs]}
    return result


def step_times(gen: Any, settings: Settings, rng: np.random.Generator) -> dict[str, Any]:
    """Target passes of 1-, 16- and 64-node trees after ``step_past`` committed rows (argmax or logits back), and a
    one-node draft call (its top tokens back), in ms: medians after warm-ups."""
    from specx.runtime.decoding import prefill
    from specx.runtime.tree import chain

    target = gen.target
    past = rng.integers(0, target.contract.vocab_size, settings.step_past).astype(np.int64)
    target.reset()
    target.reserve(past.size + max(settings.pass_sizes) + 1)
    prefill(target, past)
    passes = {}
    for nodes in settings.pass_sizes:
        tree = random_tree(nodes, rng)
        tokens = rng.integers(0, target.contract.vocab_size, nodes).astype(np.int64)
        args = (tokens[None], tree.positions(past.size), tree.attention_mask(past.size))
        passes[str(nodes)] = {
            "argmax_ms": median_ms(lambda: target.forward_tokens(*args), settings.warmups + 2, settings.step_repeats),
            "logits_ms": median_ms(lambda: target.forward(*args), settings.warmups + 2, settings.step_repeats)}
    draft = gen.draft
    draft.reset()
    draft.reserve(past.size + 2)
    run = chain(past.size)
    draft.forward_tokens(past[None], run.positions(0), run.attention_mask(0), draft_extra(draft, past.size))
    draft.commit()
    one = (past[-1:][None], np.asarray([[past.size]]), np.ones((1, 1, 1, past.size + 1), dtype=bool),
           draft_extra(draft, 1))
    call = (lambda: draft.forward_top(*one)) if draft.contract.top_k else (lambda: draft.forward(*one))
    draft_ms = median_ms(call, settings.warmups + 2, settings.step_repeats)
    step = passes[str(min(settings.pass_sizes))]["argmax_ms"]
    return {"past": int(past.size), "passes": passes, "draft_call_ms": draft_ms, "draft_over_target": draft_ms / step}


def draft_extra(draft: Any, rows: int) -> dict[str, np.ndarray] | None:
    """A feature draft's extra inputs for a first call of ``rows`` tokens (target features: zeros here), else None."""
    from specx.graphs.contract import FEATURES, HIDDEN

    if not draft.contract.extra_inputs:
        return None
    return {FEATURES: np.zeros((1, rows, draft.contract.feature_width), np.float32),
            HIDDEN: np.zeros((1, 0, draft.contract.hidden_size), np.float32)}


def graphs_child(bundle: Path, provider: str, settings: Settings) -> dict[str, Any]:
    """In the child process: Generator.load(cuda_graphs=True) (every bucketed target pass on fixed device buffers,
    captured as a CUDA graph on CUDA; on the CPU the same passes run uncaptured): tokens, speeds and step times."""
    from specx.runtime import Generator

    start = time.perf_counter()
    gen = Generator.load(bundle, provider=provider, cuda_graphs=True)
    loaded = time.perf_counter() - start
    prompt = make_prompt(gen.target.contract.vocab_size, settings)
    return {"load_seconds": loaded, "provider": gen.provider, "tokens": tokens_by_mode(gen, prompt, settings, MODES),
            "speed": speeds(gen, prompt, settings, MODES),
            "steps": step_times(gen, settings, np.random.default_rng(CHECK_SEED))}


def placement_child(graph: Path, provider: str) -> None:
    """In the child process: open ``graph`` with ONNX Runtime's verbose log on stderr (the parent parses it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 0  # VERBOSE: VerifyEachNodeIsAssignedToAnEp lists the nodes on each provider
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(graph), options, providers=providers)
    print(json.dumps({"providers": session.get_providers()}))


def parse_placement(log: str) -> dict[str, Any]:
    """Nodes per execution provider, the op types placed on the CPU, and the memcpy nodes inserted."""
    counts: dict[str, int] = {}
    cpu_ops: Counter = Counter()
    current = None
    for line in log.splitlines():
        placed = PLACED.search(line)
        if placed:
            current = placed.group(1)
            counts[current] = int(placed.group(2))
            continue
        node = PLACED_NODE.search(line)
        if node and current == "CPUExecutionProvider":
            cpu_ops[node.group(1)] += 1
    return {"nodes": counts, "cpu_op_types": dict(cpu_ops.most_common()), "memcpy_nodes": len(MEMCPY.findall(log))}


def placement(bundle: Path, provider: str) -> dict[str, Any]:
    from specx.runtime.bundle import Bundle

    loaded = Bundle.load(bundle)
    result: dict[str, Any] = {}
    for role, entry in (("target", loaded.manifest.target), ("draft", loaded.manifest.draft)):
        if entry is None:
            continue
        done = run_child(["--placement-child", str(loaded.graph_path(entry)), "--provider", provider])
        placed = child_json(done)
        if "error" not in placed and not isinstance(done, str):
            placed.update(parse_placement(done.stderr))
        result[role] = placed
    return result


# -- checks on one bundle --------------------------------------------------------------------------------------
@dataclass
class Context:
    shape: ModelShape
    dtype: str
    settings: Settings
    provider: str
    prompt: list[int]
    bundle: Path
    device: Any  # Generator on --provider
    cpu: Any  # Generator on the CPU; None where the CPU cannot run the dtype (bf16)
    tolerance: float = 0.0  # logit noise of this dtype: near ties below it
    device_tokens: dict[str, list[int]] = field(default_factory=dict)  # per mode, eager and unpadded
    failures: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.shape.name} {self.dtype}"


@contextlib.contextmanager
def padded_trees(gen: Any) -> Iterator[None]:
    """Verify passes padded to the tree buckets, as Generator.load(pad_trees=True) sets them."""
    from specx.runtime.tree import TREE_BUCKETS

    saved, gen.tree_buckets = gen.tree_buckets, TREE_BUCKETS
    try:
        yield
    finally:
        gen.tree_buckets = saved


def parity(ctx: Context, rng: np.random.Generator) -> dict[str, Any]:
    """Device vs CPU logits of one tree pass after a past, and the device's next_tokens against their argmax; where
    the CPU cannot run the dtype, the device against PyTorch as export measured it (on the GPU)."""
    vocab = ctx.device.target.contract.vocab_size
    past = rng.integers(0, vocab, ctx.settings.parity_past).astype(np.int64)
    tree = random_tree(ctx.settings.parity_nodes, rng)
    tokens = rng.integers(0, vocab, tree.size).astype(np.int64)
    args = (tokens[None], tree.positions(past.size), tree.attention_mask(past.size))
    device = tree_logits(ctx.device, past, args)
    result = {"device_next_tokens_equal_argmax": bool(np.array_equal(ctx.device.target.forward_tokens(*args)[0],
                                                                     device.argmax(-1))),
              "nodes": int(tree.size), "past": int(past.size)}
    if ctx.cpu is None:  # export's |ORT - torch| on this device stands for device vs CPU
        exported = manifest_parity(ctx.bundle)["target"]
        return {**result, "max_abs_logit_diff": float(exported.get("max_abs_logit_diff", float("nan"))),
                "reference": f"PyTorch at export ({exported.get('provider', 'not measured')})",
                "max_abs_logit": float(np.max(np.abs(device))), "argmax_agreement": float("nan")}
    cpu = tree_logits(ctx.cpu, past, args)
    return {**result, "max_abs_logit_diff": float(np.max(np.abs(device - cpu))),
            "max_abs_logit": float(np.max(np.abs(cpu))),
            "argmax_agreement": float(np.mean(device.argmax(-1) == cpu.argmax(-1)))}


def tree_logits(gen: Any, past: np.ndarray, args: tuple) -> np.ndarray:
    """``gen``'s target logits of one tree pass (``args``) after ``past`` committed tokens, float64."""
    from specx.runtime.decoding import prefill

    gen.target.reset()
    gen.target.reserve(past.size + args[0].shape[1])
    prefill(gen.target, past)
    return gen.target.forward(*args)[0].astype(np.float64)


def logit_gap(gen: Any, prompt: Sequence[int], generated: Sequence[int], a: int, b: int) -> float:
    """|logit(a) - logit(b)| of ``gen``'s target after prompt + generated: how close the choice between them was."""
    from specx.runtime.decoding import feed

    ids = np.asarray([*prompt, *generated], dtype=np.int64)
    gen.target.reset()
    gen.target.reserve(ids.size + 1)
    logits = feed(gen.target, ids)
    return abs(float(logits[a]) - float(logits[b]))


def compare(ctx: Context, check: str, reference: list[int], tokens: list[int], judge: Any) -> dict[str, Any]:
    """One equality row: equal, a near tie (``judge``'s logit gap within the dtype's noise), or DIFFERS."""
    first = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
    row: dict[str, Any] = {"check": check, "tokens": len(tokens)}
    if first is None and len(reference) == len(tokens):
        return {**row, "verdict": "equal"}
    if first is None:
        row.update(verdict="DIFFERS", detail=f"{len(tokens)} tokens against {len(reference)}")
    else:
        gap = logit_gap(judge, ctx.prompt, reference[:first], reference[first], tokens[first])
        near = gap <= ctx.tolerance
        row.update(verdict="near tie" if near else "DIFFERS", first_difference=first, logit_gap=gap,
                   tolerance=ctx.tolerance,
                   detail=f"token {first}: gap {gap:.3g} {'<=' if near else '>'} {ctx.tolerance:.3g}")
    if row["verdict"] == "DIFFERS":
        ctx.failures.append(f"{ctx.label}: {check}: {row['detail']}")
    return row


def equality(ctx: Context) -> list[dict[str, Any]]:
    """Every mode on the device against plain decoding on the CPU and on the device (and the same mode on the CPU
    where the shape allows); then padded tree passes against unpadded ones."""
    s = ctx.settings
    cpu = {} if ctx.cpu is None else tokens_by_mode(ctx.cpu, ctx.prompt, s,
                                                    MODES if ctx.shape.cpu_modes else MODES[:1])
    ctx.device_tokens = tokens_by_mode(ctx.device, ctx.prompt, s, MODES)
    plain = ctx.device_tokens["autoregressive"]
    rows = [] if ctx.cpu is None else [compare(ctx, "autoregressive: device vs cpu", cpu["autoregressive"], plain,
                                               ctx.cpu)]
    for mode in TREE_MODES:
        tokens = ctx.device_tokens[mode]
        if ctx.cpu is not None:
            rows.append(compare(ctx, f"{mode}: device vs cpu autoregressive", cpu["autoregressive"], tokens, ctx.cpu))
        rows.append(compare(ctx, f"{mode}: device vs device autoregressive", plain, tokens, ctx.device))
        if mode in cpu:
            rows.append(compare(ctx, f"{mode}: device vs cpu {mode}", cpu[mode], tokens, ctx.cpu))
    with padded_trees(ctx.device):
        padded = tokens_by_mode(ctx.device, ctx.prompt, s, TREE_MODES)
    for mode in TREE_MODES:
        rows.append(compare(ctx, f"{mode}: padded vs unpadded trees (device)", ctx.device_tokens[mode], padded[mode],
                            ctx.device))
    return rows


def cuda_graph_rows(ctx: Context, child: dict[str, Any]) -> list[dict[str, Any]]:
    """The CUDA-graph child's tokens against the device's eager, unpadded ones, per mode."""
    what = "CUDA graphs" if ctx.provider == "cuda" else "fixed-buffer passes (no capture on the CPU)"
    if "tokens" not in child:
        reason = child.get("not_run") or child.get("error", "?")
        if "error" in child:
            ctx.failures.append(f"{ctx.label}: {what}: {reason}")
        return [{"check": f"{what} on vs off", "verdict": "NOT RUN" if "not_run" in child else "FAILED",
                 "detail": reason}]
    return [compare(ctx, f"{mode}: {what} on vs off (device)", ctx.device_tokens[mode], child["tokens"][mode],
                    ctx.device) for mode in MODES]


def check_bundle(ctx: Context, bundle: Path, clock: Clock, budget_s: float) -> dict[str, Any]:
    rng = np.random.default_rng(CHECK_SEED)
    manifest = manifest_parity(bundle)
    result: dict[str, Any] = {"manifest_parity": manifest, "device_provider": ctx.device.provider}
    clock.say(f"{ctx.label}: parity")
    result["parity"] = parity(ctx, rng)
    noise = manifest["target"].get("tolerance", 0.0)
    ctx.tolerance = max(noise, TIE_FACTOR * result["parity"]["max_abs_logit_diff"])
    if not result["parity"]["max_abs_logit_diff"] <= noise and "int" not in ctx.dtype:  # int: measured, not held
        hint = " (fp32 on CUDA: the CUDA EP's use_tf32 option may be on)" if ctx.dtype == "fp32" else ""
        ctx.failures.append(f"{ctx.label}: device vs cpu logits differ by {result['parity']['max_abs_logit_diff']:.3g} "
                            f"(the dtype's tolerance {noise:.3g}){hint}")
    if not result["parity"]["device_next_tokens_equal_argmax"]:
        ctx.failures.append(f"{ctx.label}: the device's next_tokens differ from the argmax of its logits")
    clock.say(f"{ctx.label}: greedy equality (eager, padded)")
    result["equality"] = equality(ctx)
    clock.say(f"{ctx.label}: tokens/s and step times")
    result["speed"] = speeds(ctx.device, ctx.prompt, ctx.settings, MODES)
    with padded_trees(ctx.device):
        result["speed_padded"] = speeds(ctx.device, ctx.prompt, ctx.settings, TREE_MODES)
    result["steps"] = step_times(ctx.device, ctx.settings, rng)
    result["cuda_graphs"] = cuda_graphs(ctx, bundle, clock, budget_s)
    result["equality"] += cuda_graph_rows(ctx, result["cuda_graphs"])
    return result


def cuda_graphs(ctx: Context, bundle: Path, clock: Clock, budget_s: float) -> dict[str, Any]:
    if not is_static(bundle):
        return {"not_run": f"{ctx.dtype} bundles are dynamic-shape (cuda_graphs needs fp16, fp16-int8 or fp16-int4)"}
    if clock.elapsed > budget_s:
        return {"not_run": f"time budget ({clock.elapsed:.0f} s of {budget_s:.0f} s used)"}
    clock.say(f"{ctx.label}: CUDA graphs (child process)")
    smoke = ["--smoke"] if ctx.settings == SMOKE_SETTINGS else []
    return child_json(run_child(["--graphs-child", str(bundle), "--provider", ctx.provider, *smoke]))


# -- one run ---------------------------------------------------------------------------------------------------
def jobs(shapes: Sequence[ModelShape], only: Sequence[str]) -> list[tuple[ModelShape, str]]:
    """(shape, dtype) in run order: every model's first dtype, then every model's second, ...: a time budget cuts
    the least important ones (SmolLM2 fp16 and gpt2-large fp16 run first)."""
    longest = max(len(shape.dtypes) for shape in shapes)
    return [(shape, shape.dtypes[i]) for i in range(longest) for shape in shapes
            if i < len(shape.dtypes) and (not only or shape.dtypes[i] in only)]


def run_jobs(shapes: Sequence[ModelShape], settings: Settings, args: argparse.Namespace, report: dict[str, Any],
             clock: Clock) -> None:
    from specx.errors import ProviderError

    built: dict[str, bool] = {}  # model -> checkpoint built in this run (False: an earlier run's, reused)
    for shape, dtype in jobs(shapes, args.dtypes):
        entry = report["models"].setdefault(shape.name, {"shape": asdict(shape), "bundles": {}})
        why = report["preflight"]["skipped_dtypes"].get(dtype)
        if why is None and clock.elapsed > args.budget_s:
            why = f"time budget ({clock.elapsed:.0f} s of {args.budget_s:.0f} s used)"
        if why:
            entry["bundles"][dtype] = {"not_run": why}
            clock.say(f"{shape.name} {dtype}: NOT RUN: {why}")
            continue
        checkpoint = args.work / shape.name / "checkpoint"
        if shape.name not in built:
            clock.say(f"{shape.name}: building a random-weight checkpoint")
            start = time.perf_counter()
            built[shape.name] = build_checkpoint(shape, settings, checkpoint)
            entry["checkpoint_seconds"] = time.perf_counter() - start if built[shape.name] else None
        try:
            entry["bundles"][dtype] = run_bundle(shape, dtype, settings, args, checkpoint, not built[shape.name],
                                                 report, clock)
        except ProviderError:
            raise  # CUDA unusable: nothing else can run
        except Exception as exc:  # noqa: BLE001 (one bundle's crash is a finding; the other bundles still run)
            entry["bundles"][dtype] = {"not_run": f"crashed: {first_line(exc)}",
                                       "traceback": traceback.format_exc().splitlines()[-12:]}
            report["failures"].append(f"{shape.name} {dtype}: crashed: {first_line(exc)}")
            clock.say(f"{shape.name} {dtype}: CRASHED: {first_line(exc)}")
        write_report(report, args.out)


def run_bundle(shape: ModelShape, dtype: str, settings: Settings, args: argparse.Namespace, checkpoint: Path,
               reuse: bool, report: dict[str, Any], clock: Clock) -> dict[str, Any]:
    from specx.runtime import Generator

    bundle = args.work / shape.name / dtype
    clock.say(f"{shape.name} {dtype}: exporting" + (" and training a draft" if dtype == TRAINED else ""))
    made = export_trained(shape, checkpoint, bundle, reuse) if dtype == TRAINED else \
        export(shape, checkpoint, dtype, bundle, reuse)
    result: dict[str, Any] = {"export": made}
    if "error" in result["export"]:
        report["failures"].append(f"{shape.name} {dtype}: export: {result['export']['error']}")
    clock.say(f"{shape.name} {dtype}: node placement (child process)")
    result["placement"] = placement(bundle, args.provider)
    device = Generator.load(bundle, provider=args.provider)  # provider="cuda" raises when ORT fell back to the CPU
    cpu = Generator.load(bundle, provider="cpu") if cpu_runs(dtype) else None  # bf16: the device alone
    ctx = Context(shape, dtype, settings, args.provider, make_prompt(device.target.contract.vocab_size, settings),
                  bundle, device, cpu)
    result.update(check_bundle(ctx, bundle, clock, args.budget_s))
    report["failures"] += ctx.failures
    del device, cpu, ctx
    gc.collect()
    return result


def write_report(report: dict[str, Any], out: Path) -> Path:
    path = out / "gpu-check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    return path


# -- tables ----------------------------------------------------------------------------------------------------
def bundles(report: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for model, entry in report["models"].items():
        for dtype, result in entry["bundles"].items():
            yield model, dtype, result


def parity_table(report: dict[str, Any]) -> str:
    rows = []
    for model, dtype, r in bundles(report):
        if "not_run" in r:
            rows.append([model, dtype, "NOT RUN: " + r["not_run"]])
            continue
        export, target, p = r["export"], r["manifest_parity"]["target"], r["parity"]
        seconds = "reused" if export.get("reused") else fmt(export["seconds"])
        unquantized = target.get("unquantized_max_abs_logit_diff")  # quantized graphs: measured, not held
        held = f" (unquantized {fmt(unquantized)})" if unquantized is not None else ""
        rows.append([model, dtype, seconds, f"{fmt(target.get('max_abs_logit_diff'))}{held} / "
                     f"{fmt(target.get('tolerance'))} ({target.get('provider', 'not measured')})",
                     fmt(p["max_abs_logit_diff"]), fmt(p["max_abs_logit"]),
                     fmt(p["argmax_agreement"]), "yes" if p["device_next_tokens_equal_argmax"] else "NO",
                     export.get("error", "")])
    return table(["model", "dtype", "export s", "manifest |ORT-torch| / tol (on)", "device vs cpu max|dlogit|",
                  "max|logit|", "argmax agree", "next_tokens==argmax", "export error"], rows)


def placement_table(report: dict[str, Any]) -> str:
    rows = []
    for model, dtype, r in bundles(report):
        for role, p in r.get("placement", {}).items():
            if "error" in p:
                rows.append([model, dtype, role, "ERROR " + p["error"]])
                continue
            nodes = ", ".join(f"{ep.replace('ExecutionProvider', '')} {n}" for ep, n in p["nodes"].items())
            on_cuda = "CUDAExecutionProvider" in p["nodes"]  # on the CPU provider alone, every node is a CPU node
            cpu_ops = ", ".join(f"{op} {n}" for op, n in p["cpu_op_types"].items()) if on_cuda else "-"
            rows.append([model, dtype, role, nodes, p["memcpy_nodes"], cpu_ops])
    return table(["model", "dtype", "graph", "nodes per provider", "memcpy nodes", "op types on the CPU"], rows)


def equality_table(report: dict[str, Any]) -> str:
    rows = [[model, dtype, row["check"], row["verdict"], row.get("detail", "")]
            for model, dtype, r in bundles(report) for row in r.get("equality", [])]
    return table(["model", "dtype", "check (greedy)", "result", "detail"], rows)


def speed_cells(speed: dict[str, Any], steps: dict[str, Any] | None) -> list[str]:
    cells = []
    for mode in MODES:
        s = speed.get(mode)
        cells.append("-" if s is None else fmt(s["tokens_per_second"]) + (
            "" if mode == "autoregressive" else f" ({s['tokens_per_target_call']:.2f}/call)"))
    if steps is None:
        return cells + ["-"] * 4
    passes = steps["passes"]
    largest, smallest = passes[max(passes, key=int)], passes[min(passes, key=int)]
    return cells + [" / ".join(fmt(passes[k]["argmax_ms"]) for k in passes),
                    " / ".join(fmt(passes[k]["logits_ms"]) for k in passes),
                    fmt(largest["argmax_ms"] / smallest["argmax_ms"]),
                    f"{fmt(steps['draft_call_ms'])} ms = {steps['draft_over_target']:.1%}"]


def speed_table(report: dict[str, Any]) -> str:
    graphs_path = "CUDA graphs" if report["meta"]["provider"] == "cuda" else "fixed buffers"  # no capture on the CPU
    rows = []
    for model, dtype, r in bundles(report):
        if "speed" not in r:
            continue
        rows.append([model, dtype, "eager", *speed_cells(r["speed"], r["steps"])])
        rows.append([model, dtype, "padded trees", *speed_cells(r["speed_padded"], None)])
        graphs = r["cuda_graphs"]
        if "speed" in graphs:
            rows.append([model, dtype, graphs_path, *speed_cells(graphs["speed"], graphs["steps"])])
        else:  # the equality table says why
            rows.append([model, dtype, graphs_path, "NOT RUN" if "not_run" in graphs else "FAILED"])
    sizes = "/".join(next((list(r["steps"]["passes"]) for _, _, r in bundles(report) if "steps" in r), []))
    return table(["model", "dtype", "path", "plain tok/s", "speculative", "staged", "ngram",
                  f"pass {sizes} ms (argmax)", f"pass {sizes} ms (logits)", "largest/1-node",
                  "draft call vs 1-node step"], rows)


def print_tables(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"\n== specx GPU check: provider {meta['provider']}, {report['preflight'].get('device')}, "
          f"onnxruntime {report['preflight'].get('onnxruntime', {}).get('version')}, {meta['elapsed_s']:.0f} s"
          f"{' (smoke: tiny models, CPU against CPU: the plumbing only)' if meta['smoke'] else ''}")
    print("\n(0) node placement\n" + placement_table(report))
    print("\n(1) parity\n" + parity_table(report))
    print("\n(2) greedy equality\n" + equality_table(report))
    print("\n(3) speed (medians after warm-ups; random weights: compare step costs, not acceptance)\n"
          + speed_table(report))
    not_run = [f"{model} {dtype}: {r['not_run']}" for model, dtype, r in bundles(report) if "not_run" in r]
    print(f"\n{len(not_run)} bundle(s) not run" + "".join(f"\n  NOT RUN {line}" for line in not_run))
    failures = report["failures"]
    print(f"{len(failures)} failure(s)" + "".join(f"\n  FAIL {f}" for f in failures))


# -- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny models (seconds; the CPU test)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="gpu-check.json goes here")
    parser.add_argument("--work", type=Path, help="checkpoints and bundles (GBs), reused by a rerun; default "
                        f"{WORK_ROOT}/smoke or /full (outside --out: the device tool brings OUT back)")
    parser.add_argument("--models", help="comma-separated model names to run (default: all of the mode's)")
    parser.add_argument("--dtypes", help="comma-separated dtypes to run (default: each model's list)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="start no bundle or CUDA-graph run after this many seconds (reported as NOT RUN)")
    parser.add_argument("--graphs-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--placement-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = args.work or WORK_ROOT / ("smoke" if args.smoke else "full")
    args.dtypes = tuple(args.dtypes.split(",")) if args.dtypes else ()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke else GPU_SETTINGS
    if args.graphs_child:
        print(json.dumps(graphs_child(args.graphs_child, args.provider, settings)))
        return 0
    if args.placement_child:
        placement_child(args.placement_child, args.provider)
        return 0
    clock = Clock()
    shapes = (TINY_LLAMA, TINY_GPT2) if args.smoke else (SMOLLM2, GPT2_LARGE)
    if args.models:
        shapes = tuple(s for s in shapes if s.name in args.models.split(","))
    info, fatal = preflight(args.provider, [d for s in shapes for d in s.dtypes])
    print(json.dumps(info, indent=1))
    if fatal:
        print("\n".join(f"MISSING: {problem}" for problem in fatal), file=sys.stderr)
        return EXIT_MISSING
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": {"provider": args.provider, "smoke": args.smoke, "settings": asdict(settings),
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": 0.0},
                              "preflight": info, "models": {}, "failures": []}
    from specx.errors import ProviderError

    try:
        if args.provider == "cuda":
            info["cuda_session"] = check_cuda_session(args.work)
            clock.say(f"CUDA session: {info['cuda_session']}")
        run_jobs(shapes, settings, args, report, clock)
    except ProviderError as exc:
        print(f"FAIL: onnxruntime cannot run on CUDA: {exc}", file=sys.stderr)
        report["failures"].append(f"CUDA unusable: {exc}")
        write_report(report, args.out)
        return EXIT_NO_CUDA
    report["meta"]["elapsed_s"] = clock.elapsed
    print_tables(report)
    print(f"\nreport: {write_report(report, args.out)}")
    return EXIT_FAILED if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

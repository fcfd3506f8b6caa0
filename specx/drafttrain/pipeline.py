"""`specx train-draft BUNDLE`: give a bundle's target a trained feature draft, offline.

    load the target from the manifest's source (hub id, directory, GGUF)
    -> texts: the target writes its training text (+ --corpus files)
    -> labels: one teacher-forced pass: features, distributions
    -> training: draft vocabulary (the K tokens the target uses most), unrolled soft cross-entropy, checkpoints
    -> graphs: held-out agreement; the target again, now with its features output; the draft; parity with torch;
       a short greedy decode through the runtime for tau -> manifest -> the bundle replaced in one rename

Each phase keeps its output in a work directory (workdir.py; default $SPECX_HOME/train-work/NAME-DIGEST) with a
manifest of what made it: a run killed at any moment continues from the last shard or checkpoint (``resume``, the
default) and ends with the same draft; a phase whose output is complete is skipped. Under a launcher (torchrun,
accelerate launch: distributed.py) the processes share the phases' shards and train data-parallel; the main
process writes the bundle. The new bundle is assembled in a hidden directory beside the old one (unchanged files
hard-linked), so an interrupted run leaves the bundle exactly as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np
import torch

from specx.drafttrain.checkpoint import load_draft, save_draft
from specx.drafttrain.data import DEFAULT_SHARD_TOKENS, TOP_K, DistillationSet, Progress, draft_vocabulary, no_progress
from specx.drafttrain.distributed import DEFAULT_TIMEOUT_SECONDS, Ranks, processes
from specx.drafttrain.model import FeatureDraftModel
from specx.drafttrain.phases import PRECISIONS, DataRequest, TrainingData, target_fingerprint, training_data
from specx.drafttrain.teacher import TEACHERS, GraphTeaching, TeacherGraph, teacher_graph, teacher_identity
from specx.drafttrain.precision import fast_dtype
from specx.drafttrain.train import (CHECKPOINT_MINUTES, Checkpointing, TrainConfig, TrainLog, agreement,
                                    default_feature_layers, new_draft, train)
from specx.drafttrain.workdir import DiskUse, Phase, check_disk, digest, disk_use, locked, written
from specx.errors import ExportError, InvalidArgumentError
from specx.exporter.adapters import adapter_for
from specx.exporter.onnx_export import DEFAULT_OPSET, commit_path
from specx.exporter.pipeline import export_model, quantized_like, with_records
from specx.exporter.sources import load_source
from specx.exporter.validate import TOLERANCE
from specx.graphs.builder import save_with_external_data
from specx.graphs.contract import FEATURES, HIDDEN, HIDDEN_STATES, GraphContract
from specx.graphs.feature_draft import build_feature_draft
from specx.graphs.helpers import write_kv_commit
from specx.graphs.passes import embed_contract, weight_bytes
from specx.graphs.precision import FLOAT_NAMES
from specx.graphs.quantize import (ACCURACY_LEVEL, EXACT_ACCURACY_LEVEL, SUPPORTED_BITS, quantize_built, scheme,
                                   unquantized_path)
from specx.runtime.bundle import Bundle, specx_home
from specx.runtime.manifest import MANIFEST_FILE, ArchitectureSpec, Manifest, ModelEntry
from specx.runtime.session import DecoderSession, cuda_available, open_session
from specx.runtime.swap import TRAINING, check_replaceable, replace_bundle, sibling
from specx.runtime.tree import chain

DRAFT_GRAPH = "draft.onnx"
VOCAB_FILE = "draft_vocab.npy"
DRAFT_WEIGHTS = "draft.safetensors"  # the trained draft, in the training phase's folder
CHECKPOINT = "checkpoint.safetensors"
PHASES = ("texts", "labels", "train", "graphs")
# SmolLM2-135M on a 2-core AMX CPU with 8 epochs: 51.7 min end to end, 1.42x greedy (docs/benchmarks.md)
DEFAULT_TOKENS = 700_000  # on a GPU (minutes)
# On a CPU: what a 2-core CPU without AMX writes, labels and trains (8 epochs) within the hour for SmolLM2-135M
# (a 200k run took 35 minutes there: texts 12.4, labels 3.9, training 17.7, export and checks ~1; 700k took ~2 h)
CPU_DEFAULT_TOKENS = 250_000
DEFAULT_DRAFT_VOCAB = 8192
DEFAULT_DRAFT_BITS = 8  # measured: the same draft at 0.045 of a target step (fp32: 0.095), 1.15x vs 1.03x greedy
HELD_OUT_SHARE = 0.05
MIN_HELD_OUT = 2
PARITY_ROWS = 6
TAU_PROMPTS = 4
TAU_PROMPT_TOKENS = 24
TAU_NEW_TOKENS = 48
PARITY_TOLERANCE = 1e-3  # |ORT - torch| relative to max(1, max |logit|)

Step = Callable[[str], ContextManager[None]]


@dataclass(frozen=True)
class TrainDraftRequest:
    bundle: Path
    tokens: int | None = None  # self-generated training tokens; None: default_tokens(device)
    corpus: tuple[Path, ...] = ()
    draft_vocab: int = DEFAULT_DRAFT_VOCAB
    device: str = "auto"  # auto | cpu | cuda: where torch trains
    seed: int = 0
    epochs: float = TrainConfig.epochs
    feature_layers: tuple[int, ...] | None = None  # None: EAGLE-3's low / middle / high
    cache_data: bool = True  # keep the work directory after success (later runs reuse its data)
    draft_bits: int | None = DEFAULT_DRAFT_BITS  # weight-only quantized draft graph (8 or 4 bits); None: float32
    draft_layers: int = 1  # decoder layers in the draft
    hard_label: float = TrainConfig.hard_label  # share of the label mass on the target's argmax (train.label_mass)
    work_dir: Path | None = None  # None: $SPECX_HOME/train-work/NAME-DIGEST
    resume: bool = True  # continue the phases an earlier run left in the work directory; False: start over
    batch: int = TrainConfig.batch  # texts per optimizer step, over all processes
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per data shard
    checkpoint_minutes: float = CHECKPOINT_MINUTES
    checkpoint_steps: int = 0  # also checkpoint every this many steps (0: by time alone)
    precision: str = "auto"  # auto | fp32 | bf16: the target copy writing and labelling the text, the draft's autocast
    teacher: str = "source"  # source | graph: the PyTorch source or the bundle's target graph writes and labels
    collective_timeout: float = DEFAULT_TIMEOUT_SECONDS  # seconds a process waits for the others


@dataclass
class TrainDraftResult:
    bundle: Path
    training: dict  # what the manifest records ({} in the processes of a job that do not write the bundle)
    rank: int = 0


def train_draft(request: TrainDraftRequest, step: Step, progress: Progress = no_progress) -> TrainDraftResult:
    bundle = Bundle.load(request.bundle)
    check_replaceable(bundle.path)  # before the work: the bundle is replaced at the end
    _check_request(request)
    if bundle.manifest.target.contract.kv_dtype == "bfloat16" and not (torch.cuda.is_available()
                                                                       and cuda_available("cuda")):
        raise InvalidArgumentError(f"{bundle.path.name} is bf16, whose graphs run on CUDA only: train its draft on a "
                                   "machine with a GPU and onnxruntime-gpu (the checks run the new graphs)")
    with processes(_device(request.device), request.collective_timeout) as (ranks, device):
        if request.batch < ranks.world_size:
            raise InvalidArgumentError(f"--batch {request.batch} is smaller than the {ranks.world_size} processes: "
                                       "each needs a text of every batch; raise --batch")
        if not ranks.main:  # the main process reports for the job
            step, progress = _quiet, no_progress
        if request.tokens is None:
            request = replace(request, tokens=default_tokens(device))
        return _train_draft(request, bundle, ranks, device, step, progress)


def default_tokens(device: str) -> int:
    """The default budget of training text: DEFAULT_TOKENS where torch trains on a GPU, CPU_DEFAULT_TOKENS on a CPU
    (the default run within the hour on 2 cores)."""
    return DEFAULT_TOKENS if device == "cuda" else CPU_DEFAULT_TOKENS


def _train_draft(request: TrainDraftRequest, bundle: Bundle, ranks: Ranks, device: str, step: Step,
                 progress: Progress) -> TrainDraftResult:
    manifest = bundle.manifest
    started = time.perf_counter()
    with step(f"loading the target {Path(manifest.target.source).name}"):
        loaded = load_source(manifest.target.source, "fp32")
    adapter = adapter_for(loaded.model.config)
    layers = request.feature_layers or default_feature_layers(adapter.spec.num_layers)
    torch.manual_seed(request.seed)
    work = request.work_dir or default_work_dir(manifest, request, layers)
    with locked(work) if ranks.main else contextlib.nullcontext():
        if ranks.main and not request.resume:
            clear_phases(work)
        ranks.barrier("opening the work directory")  # nothing is read before the main process has cleared it
        use = _disk_use(work, loaded, adapter, layers, request)
        with step(f"work directory {work}: {use.describe()}"):
            check_disk(work, use)
        teacher = _graph_teacher(work, manifest, loaded, adapter, layers, request.teacher, step)
        data_request = DataRequest(request.tokens, request.seed, request.corpus, layers, request.shard_tokens,
                                   request.precision, teacher.identity if teacher else None)
        made = training_data(work, loaded, data_request, device, ranks, step, progress, teacher)
        trained = _training_phase(work, made, loaded, adapter, layers, request, device, ranks, progress)
        if not ranks.main:
            return TrainDraftResult(bundle.path, {}, ranks.rank)
        result = _graphs_phase(work, bundle, loaded, adapter, layers, trained, request, ranks, step, started)
    if not request.cache_data:
        clear_work_dir(work)
    return result


def _graph_teacher(work: Path, manifest: Manifest, loaded, adapter, layers: tuple[int, ...],  # noqa: ANN001
                   teacher: str, step: Step) -> GraphTeaching | None:
    """With the graph as teacher: the bundle's target graph, exported into the work directory (once) and opened
    where the bundle's graphs run, on first use."""
    if teacher != "graph":
        return None
    fingerprint = target_fingerprint(loaded.model, loaded.tokenizer)

    def open_graph() -> TeacherGraph:
        root, entry = teacher_graph(work, manifest, loaded, adapter, layers, fingerprint, step)
        provider = "cuda" if entry.contract.kv_dtype == "bfloat16" else "auto"  # bf16: CUDA kernels only
        return TeacherGraph(root, entry, provider)

    return GraphTeaching(teacher_identity(manifest, layers, fingerprint), open_graph, loaded.model.config)


@contextlib.contextmanager
def _quiet(_: str) -> Iterator[None]:
    yield


def default_work_dir(manifest: Manifest, request: TrainDraftRequest, layers: tuple[int, ...]) -> Path:
    """$SPECX_HOME/train-work/NAME-DIGEST, keyed by what the data depends on besides the budget (a smaller budget
    reuses a larger one's data; the phases' manifests decide what is reused)."""
    key = {"source": manifest.target.source, "seed": request.seed, "layers": list(layers),
           "corpus": [str(Path(p).resolve()) for p in request.corpus]}
    return specx_home() / "train-work" / f"{Path(manifest.target.source).name}-{digest(key)}"


def clear_phases(work: Path) -> None:
    """Remove the phases' output from ``work`` (nothing else)."""
    for name in PHASES:
        Phase(work / name, {}).remove()


def clear_work_dir(work: Path) -> None:
    """Remove what train-draft keeps in ``work`` (its phases and lock; nothing else), and the folder once empty."""
    clear_phases(work)
    with contextlib.suppress(OSError):
        (work / "lock").unlink()
        work.rmdir()


def _disk_use(work: Path, loaded, adapter, layers: tuple[int, ...],  # noqa: ANN001
              request: TrainDraftRequest) -> DiskUse:
    """Texts and labels per token x the budget (the corpus files' bytes bound their tokens), and the training
    checkpoint (parameters and AdamW's two moments, twice while one replaces the other) and trained draft."""
    spec = adapter.spec
    hidden, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    ffn = int(getattr(loaded.model.config, "intermediate_size", None) or 4 * hidden)
    params = (len(layers) * hidden * hidden + 2 * hidden * hidden + min(request.draft_vocab, spec.vocab_size) * hidden
              + request.draft_layers * (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn))
    per_token = 8 + 8 + 2 * len(layers) * hidden + TOP_K * (4 + 2)  # text ids; label ids, features, top-k ids, probs
    tokens = request.tokens + sum(Path(p).stat().st_size for p in request.corpus)
    return disk_use(work, per_token, tokens, 4 * params * 7, [Phase(work / name, {}) for name in PHASES])


# -- training ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trained:
    draft: FeatureDraftModel
    vocab_map: np.ndarray
    log: TrainLog
    train_set: DistillationSet
    held_out: DistillationSet
    config: TrainConfig
    digest: str  # the training phase's identity
    untrained: list[float]  # held-out agreement before training (the main process only)
    made: TrainingData
    reused: tuple[str, ...]


def _training_phase(work: Path, made: TrainingData, loaded, adapter, layers: tuple[int, ...],  # noqa: ANN001
                    request: TrainDraftRequest, device: str, ranks: Ranks, progress: Progress) -> Trained:
    data = made.data
    train_set, held_out = data.split(max(MIN_HELD_OUT, int(len(data.tokens) * HELD_OUT_SHARE)))
    vocab_map = draft_vocabulary(train_set, request.draft_vocab, adapter.spec.vocab_size)
    config = TrainConfig(epochs=float(request.epochs), seed=request.seed, hard_label=float(request.hard_label),
                         batch=request.batch)  # floats: the identity is the same from the CLI and the API
    phase = Phase(work / "train", {"data": made.digest, "texts": len(data.tokens), "config": asdict(config),
                                   "draft_vocab": request.draft_vocab, "draft_layers": request.draft_layers,
                                   "feature_layers": list(layers), "precision": request.precision})
    resumed = ranks.main and (work / "train" / CHECKPOINT).is_file() and phase.matching_record() is not None
    if ranks.main:
        phase.start(lambda: {"mixed_precision": _mixed_precision(request.precision, device)}, ranks.world_size)
    ranks.barrier("starting the training phase")
    record = phase.record()
    config = replace(config, mixed_precision=record["mixed_precision"])
    draft = new_draft(loaded.model, adapter, layers, vocab_map, request.seed, request.draft_layers)
    untrained = agreement(draft, held_out, vocab_map, adapter.spec.vocab_size, config.unroll) if ranks.main else []
    done = record.get("complete") and (phase.root / DRAFT_WEIGHTS).is_file()
    reused = made.reused + (("train",) if resumed or done else ())
    if done:
        load_draft(phase.root / DRAFT_WEIGHTS, draft)
        return Trained(draft, vocab_map, TrainLog(**record["log"]), train_set, held_out, config, phase.digest,
                       untrained, made, reused)
    checkpointing = Checkpointing(phase.root / CHECKPOINT, phase.digest, request.checkpoint_minutes * 60,
                                  request.checkpoint_steps)
    log = train(draft.to(device), train_set, vocab_map, adapter.spec.vocab_size, config, progress, checkpointing,
                ranks)
    draft.to("cpu")
    ranks.barrier("ending the training")
    if ranks.main:
        save_draft(phase.root / DRAFT_WEIGHTS, draft, phase.digest)
        phase.write({**record, "complete": True, "log": asdict(log)})
        written("train", log.steps, ranks.rank)
    return Trained(draft, vocab_map, log, train_set, held_out, config, phase.digest, untrained, made, reused)


def _mixed_precision(precision: str, device: str) -> bool:
    if precision == "auto":
        return fast_dtype(device) == torch.bfloat16
    return PRECISIONS[precision] == "bfloat16"


# -- graphs -----------------------------------------------------------------------------------------------------
def _graphs_phase(work: Path, bundle: Bundle, loaded, adapter, layers: tuple[int, ...],  # noqa: ANN001
                  trained: Trained, request: TrainDraftRequest, ranks: Ranks, step: Step,
                  started: float) -> TrainDraftResult:
    """The bundle with the draft (the main process): skipped when the bundle already holds this very draft."""
    manifest = bundle.manifest
    phase = Phase(work / "graphs", {"training": trained.digest, "bundle": str(bundle.path.resolve()),
                                    "draft_bits": request.draft_bits})
    held = (manifest.draft.training or {}) if manifest.draft is not None else {}
    if (phase.matching_record() or {}).get("complete") and held.get("run") == phase.digest:
        with step("the bundle already holds this draft (nothing left to do)"):
            return TrainDraftResult(bundle.path, dict(held))
    record = phase.start(dict, ranks.world_size)
    training = _training_record(trained, request, layers, adapter, ranks, phase.digest)
    output = _write_bundle(bundle.path, manifest, loaded, adapter, layers, trained.draft, trained.vocab_map, training,
                           trained.held_out, step, started)
    phase.write({**record, "complete": True})
    return TrainDraftResult(output, training)


def _training_record(trained: Trained, request: TrainDraftRequest, layers: tuple[int, ...], adapter,  # noqa: ANN001
                     ranks: Ranks, run: str) -> dict:
    """What the bundle's manifest says about the draft's training."""
    train_set, held_out, log, vocab_map = trained.train_set, trained.held_out, trained.log, trained.vocab_map
    reached = agreement(trained.draft, held_out, vocab_map, adapter.spec.vocab_size, trained.config.unroll)
    seen = agreement(trained.draft, train_set.head(held_out.num_tokens), vocab_map, adapter.spec.vocab_size, 1)
    return {
        "kind": "feature", "method": "self-distillation, EAGLE-3 features, unrolled soft cross-entropy"
                            + (f" ({request.hard_label:g} of each label on the argmax)" if request.hard_label else ""),
        "feature_layers": list(layers), "draft_vocab": int(vocab_map.size), "draft_layers": request.draft_layers,
        "seed": request.seed, "hard_label": request.hard_label,
        "data_tokens": trained.made.data.num_tokens, "corpus_files": [str(p) for p in request.corpus],
        "train_tokens": train_set.num_tokens, "held_out_tokens": held_out.num_tokens, "epochs": request.epochs,
        "batch": request.batch, "steps": log.steps, "first_loss": log.first_loss, "last_loss": log.last_loss,
        "train_seconds": round(log.seconds, 1), "device": _device(request.device), "draft_bits": request.draft_bits,
        "data_precision": trained.made.dtype, "mixed_precision": trained.config.mixed_precision,
        "world_size": ranks.world_size, "resumed": list(trained.reused), "run": run,
        "held_out_agreement": [round(a, 4) for a in reached],
        "train_agreement": round(seen[0], 4),  # as much training text, one level: far above held-out = more text
        "untrained_agreement": [round(a, 4) for a in trained.untrained],
    }


def _check_request(request: TrainDraftRequest) -> None:
    if request.tokens is not None and request.tokens < 0:
        raise InvalidArgumentError(f"--tokens must be >= 0, got {request.tokens}")
    if request.seed < 0:
        raise InvalidArgumentError(f"--seed must be >= 0, got {request.seed}")
    if request.draft_vocab < 2:
        raise InvalidArgumentError(f"--draft-vocab must be at least 2, got {request.draft_vocab}")
    if request.draft_layers < 1:
        raise InvalidArgumentError(f"--draft-layers must be at least 1, got {request.draft_layers}")
    if not 0 <= request.hard_label <= 1:
        raise InvalidArgumentError(f"--hard-label must lie in [0, 1], got {request.hard_label}")
    if request.epochs <= 0:
        raise InvalidArgumentError(f"--epochs must be positive, got {request.epochs}")
    if request.batch < 1:
        raise InvalidArgumentError(f"--batch must be at least 1, got {request.batch}")
    if request.shard_tokens < 1:
        raise InvalidArgumentError(f"--shard-tokens must be at least 1, got {request.shard_tokens}")
    if request.checkpoint_minutes <= 0 or request.checkpoint_steps < 0:
        raise InvalidArgumentError("--checkpoint-minutes must be positive and --checkpoint-steps >= 0")
    if request.collective_timeout <= 0:
        raise InvalidArgumentError(f"--collective-timeout must be positive, got {request.collective_timeout}")
    if request.precision != "auto" and request.precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown --precision {request.precision!r}; use auto, fp32 or bf16")
    if request.teacher not in TEACHERS:
        raise InvalidArgumentError(f"unknown --teacher {request.teacher!r}; use {', '.join(TEACHERS)}")
    if request.draft_bits is not None and request.draft_bits not in SUPPORTED_BITS:
        raise InvalidArgumentError(f"draft quantization must be int8 or int4, got {request.draft_bits} bits")
    for path in request.corpus:
        if not Path(path).is_file():
            raise InvalidArgumentError(f"--corpus file {path} does not exist")


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: this torch has no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return device


# -- the bundle -------------------------------------------------------------------------------------------------
def _write_bundle(path: Path, manifest: Manifest, loaded, adapter, layers: tuple[int, ...], draft: FeatureDraftModel,
                  vocab_map: np.ndarray, training: dict, held_out: DistillationSet, step: Step,
                  started: float) -> Path:
    staging = sibling(path, TRAINING)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        replaced = {manifest.target.graph, manifest.target.graph + ".data", manifest.target.kv_commit}
        if manifest.draft is not None:
            replaced |= {manifest.draft.graph, manifest.draft.graph + ".data", manifest.draft.kv_commit}
            replaced |= {manifest.draft.vocab_map} if manifest.draft.vocab_map else set()
        for item in path.iterdir():
            if item.is_file() and item.name not in replaced and item.name != MANIFEST_FILE and item.name[0] != ".":
                os.link(item, staging / item.name)
        target = export_model("target", loaded, adapter, staging, manifest.dtype, DEFAULT_OPSET, step,
                              source=manifest.target.source, feature_layers=layers,
                              **quantized_like(manifest.target))
        target = replace(target, derived_from=manifest.target.derived_from)
        with step("building and checking the draft graph"):
            entry = export_feature_draft(draft, vocab_map, adapter.spec, target.contract, staging, training,
                                         training.get("draft_bits"))
        new = replace(manifest, target=target, draft=entry,
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        new = with_records(new, staging)  # the files it holds now; the later write only adds the measured tau
        new.write(staging)
        with step("measuring tau on held-out text through the runtime"):
            training["held_out_tau"] = _held_out_tau(staging, held_out, check_provider(target.contract))
        training["total_seconds"] = round(time.perf_counter() - started, 1)  # data, training, graphs, checks
        new = replace(new, draft=replace(entry, training=dict(training)))
        new.write(staging)
        replace_bundle(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def export_feature_draft(draft: FeatureDraftModel, vocab_map: np.ndarray, target_spec: ArchitectureSpec,
                         target_contract: GraphContract, staging: Path, training: dict,
                         bits: int | None = None) -> ModelEntry:
    """draft.onnx (+ data), its KV-commit helper and the vocabulary map, in the target's dtype and shapes (a float16
    target: a float16 draft with static shapes, quantized with float compute as the CUDA formats are); parity with
    the torch draft checked (on the unquantized graph; a weight-quantized one, ``bits`` 8 or 4, is then measured
    against it, not held to it)."""
    spec = ArchitectureSpec(model_type="specx-feature-draft", num_layers=len(draft.layers),
                            hidden_size=target_spec.hidden_size,
                            num_heads=draft.num_heads, num_kv_heads=draft.num_kv_heads, head_dim=draft.head_dim,
                            vocab_size=int(vocab_map.size), max_positions=target_spec.max_positions,
                            position_encoding="rope", tied_embeddings=False)
    contract = GraphContract.feature_draft(spec.num_kv_heads, spec.head_dim, spec.vocab_size, spec.hidden_size,
                                           target_contract.feature_width, target_contract.kv_dtype, spec.num_layers,
                                           static_shapes=target_contract.static_shapes)
    path = staging / DRAFT_GRAPH
    if target_contract.kv_dtype == "bfloat16":
        bits = None  # MatMulNBits is built for float32 and float16 activations here: a bf16 draft stays float
    built = unquantized_path(path) if bits else path
    graph = build_feature_draft(spec, draft.to_weights(), contract, DEFAULT_OPSET)
    embed_contract(graph, contract)
    save_with_external_data(graph, built)
    write_kv_commit(contract, commit_path(path))
    parity = draft_parity(draft, built, commit_path(path), contract)
    if bits:
        quantize_built(path, bits, contract, draft_accuracy(contract))
        quantized = draft_parity(draft, path, commit_path(path), contract, enforce=False)
        parity = {**quantized, "unquantized_max_abs_logit_diff": parity["max_abs_diff"]}  # as export names it
    np.save(staging / VOCAB_FILE, vocab_map.astype(np.int64))
    return ModelEntry(role="draft", source="specx train-draft", graph=path.name, kv_commit=commit_path(path).name,
                      architecture=spec, contract=contract, weight_bytes=weight_bytes(path), parity=parity,
                      vocab_map=VOCAB_FILE, training=dict(training),
                      quantization=scheme(bits, contract.kv_dtype, draft_accuracy(contract)) if bits else None)


def draft_accuracy(contract: GraphContract) -> int:
    """MatMulNBits' accuracy level for a quantized draft: int8 compute (the CPU kernels' fast path) for float32
    activations, float compute for float16 ones (the CUDA kernels' format, as the fp16-int8/-int4 targets)."""
    return EXACT_ACCURACY_LEVEL if contract.kv_dtype == "float16" else ACCURACY_LEVEL


def check_provider(contract: GraphContract) -> str:
    """Where train-draft's checks run the new graphs: the CPU, or CUDA for bfloat16 (no CPU kernels)."""
    return "cuda" if contract.kv_dtype == "bfloat16" else "cpu"


def parity_tolerance(contract: GraphContract) -> float:
    """|ORT - torch| allowed, relative to max(1, the output's largest |value|): float16 and bfloat16 graphs are held
    to their targets' bounds."""
    return PARITY_TOLERANCE if contract.kv_dtype == "float32" else TOLERANCE[FLOAT_NAMES[contract.kv_dtype]]


def draft_parity(draft: FeatureDraftModel, path: Path, committer_path: Path, contract: GraphContract,
                 enforce: bool = True, seed: int = 0) -> dict:
    """ORT vs torch on two passes through the runtime's static cache: rows with target features, then rows with
    hidden states; logits and hidden states compared (above tolerance an ExportError when ``enforce``)."""
    rng = np.random.default_rng(seed)
    rows = PARITY_ROWS
    tokens = rng.integers(0, draft.embed.shape[0], (1, 2 * rows))
    features = rng.standard_normal((1, rows, contract.feature_width)).astype(np.float32)
    hidden = rng.standard_normal((1, rows, contract.hidden_size)).astype(np.float32)
    session, placement = open_session(path, check_provider(contract))
    committer, _ = open_session(committer_path, placement.name)
    ort = DecoderSession(session, committer, contract, placement)
    ort.reserve(2 * rows)
    first = chain(rows)
    logits_1 = ort.forward(tokens[:, :rows], first.positions(0), first.attention_mask(0),
                           {FEATURES: features, HIDDEN: np.zeros((1, 0, contract.hidden_size), np.float32)})
    hidden_1 = ort.outputs[HIDDEN_STATES].copy()
    ort.commit()
    logits_2 = ort.forward(tokens[:, rows:], first.positions(rows), first.attention_mask(rows),
                           {FEATURES: np.zeros((1, 0, contract.feature_width), np.float32), HIDDEN: hidden})
    hidden_2 = ort.outputs[HIDDEN_STATES].copy()
    with torch.no_grad():
        state = torch.cat([draft.fuse_features(torch.from_numpy(features)), torch.from_numpy(hidden)], dim=1)
        both = chain(2 * rows)
        ref_logits, ref_hidden = draft(torch.from_numpy(tokens), state, torch.from_numpy(both.positions(0)),
                                       torch.from_numpy(both.attention_mask(0)[:, :, :, :]))
    got_logits = np.concatenate([logits_1, logits_2], axis=1)
    got_hidden = np.concatenate([hidden_1, hidden_2], axis=1)
    logit_diff = float(np.abs(got_logits - ref_logits.numpy()).max())
    hidden_diff = float(np.abs(got_hidden - ref_hidden.numpy()).max())
    bound = parity_tolerance(contract)  # each output against its own scale: hidden states run ~10x the logits
    tolerance = bound * max(1.0, float(np.abs(ref_logits.numpy()).max()))
    hidden_tolerance = bound * max(1.0, float(np.abs(ref_hidden.numpy()).max()))
    if enforce and not (logit_diff <= tolerance and hidden_diff <= hidden_tolerance):  # also catches NaN
        raise ExportError(f"the draft graph differs from the trained draft by {logit_diff:.3g} in logits (tolerance "
                          f"{tolerance:.3g}) and {hidden_diff:.3g} in hidden states (tolerance "
                          f"{hidden_tolerance:.3g})")
    return {"max_abs_diff": logit_diff, "tolerance": tolerance, "max_abs_hidden_diff": hidden_diff,
            "hidden_tolerance": hidden_tolerance, "provider": placement.name}


def _held_out_tau(bundle_dir: Path, held_out: DistillationSet, provider: str) -> float:
    """Tokens per target call of greedy speculative decoding on the starts of held-out texts (tree speculation,
    no n-grams: the draft alone)."""
    from specx.runtime.generator import Generator  # the runtime, exactly as users run it

    generator = Generator.load(bundle_dir, provider=provider)
    calls = tokens = 0
    for text in held_out.tokens[:TAU_PROMPTS]:
        prompt = text[:TAU_PROMPT_TOKENS].tolist()
        result = generator.generate(prompt, max_new_tokens=TAU_NEW_TOKENS, mode="speculative", ignore_eos=True)
        calls += sum(result.stats.accepted_histogram)
        tokens += result.stats.new_tokens
    return round(tokens / calls, 3) if calls else 0.0


def training_summary(training: dict) -> str:
    agree = training.get("held_out_agreement") or []
    steps = ", ".join(f"{a:.0%}" for a in agree)
    seen = f" (on training text: {training['train_agreement']:.0%})" if "train_agreement" in training else ""
    return (f"held-out agreement with the target (1..{len(agree)} levels deep): {steps}{seen}; "
            f"tau {training.get('held_out_tau', 0):.2f}; {training.get('train_tokens', 0):,} training tokens")


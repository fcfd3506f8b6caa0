"""The data phases of `specx train-draft` in its work directory (workdir.py): the target's own texts, then their
labels (features + top-k distributions), each in shards that any process of a job may write and every process reads.

    texts   rounds of generation shards (data.next_round), shard i written by process i mod N; a barrier per round
    order   the texts (+ --corpus windows) in an order drawn from (seed, ORDER_STREAM)
    labels  that order cut into shards of whole texts (about --shard-tokens each), shard i by process i mod N

A phase's shards depend on its identity alone (target weights, budget, seed, recipe, shard size, precision), never
on how many processes wrote them or how often the run was stopped: a job of any size, resumed any number of times,
trains on the same data. A complete labels phase of a larger --tokens (everything else the same) serves a smaller
budget: its first texts, a random subset.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from transformers import PreTrainedModel

from specx.drafttrain.data import (LABELS_BAR, MAX_ROUNDS, ORDER_STREAM, TEXTS_BAR, TOP_K, DistillationSet,
                                   Progress, ProgressBar, TextShard, corpus_texts, distill, next_round, text_length,
                                   text_shares, write_text_shard)
from specx.drafttrain.distributed import Ranks
from specx.drafttrain.precision import fast_dtype, in_precision
from specx.drafttrain.teacher import GraphTeaching
from specx.drafttrain.workdir import Phase
from specx.errors import InvalidArgumentError

DATA_VERSION = 5  # bump when the data recipe changes: older work directories are then started over
LARGER_SLACK = 1.1  # labels of a larger budget up to 10% over this one are used whole
MIN_TEXTS = 4  # training texts and held-out texts need at least this many in all
FINGERPRINT_SAMPLES = 4096  # values hashed per tensor
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}  # --precision -> the dtype recorded

Step = Callable[[str], ContextManager[None]]


@dataclass(frozen=True)
class DataRequest:
    """What makes the training data."""

    tokens: int
    seed: int
    corpus: tuple[Path, ...]
    layers: tuple[int, ...]
    shard_tokens: int
    precision: str  # auto | fp32 | bf16: the target copy that writes and labels the text
    teacher: dict | None = None  # the bundle's graph writes and labels (teacher.teacher_identity); None: the source


@dataclass(frozen=True)
class TrainingData:
    data: DistillationSet  # every text, in the training order (memory-mapped shards)
    digest: str  # the labels phase's identity: what training records it trained on
    dtype: str  # the precision that wrote and labelled it
    reused: tuple[str, ...]  # phases whose earlier output this run used (resumed or skipped)


def target_fingerprint(model: PreTrainedModel, tokenizer) -> str:  # noqa: ANN001  (any HF tokenizer)
    """A digest of the target: each tensor's name, shape, dtype and an even sample of FINGERPRINT_SAMPLES values,
    and the tokenizer's size, special tokens and chat template. Cheap at any size; other weights change it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].float().cpu().numpy().tobytes())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                              template if isinstance(template, (str, dict)) else None], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def texts_phase(work: Path, fingerprint: str, request: DataRequest) -> Phase:
    writer = {"writer": request.teacher} if request.teacher is not None else {}  # the source writes: as before
    return Phase(work / "texts", {"recipe": DATA_VERSION, "target": fingerprint, "tokens": request.tokens,
                                  "seed": request.seed, "shard_tokens": request.shard_tokens,
                                  "precision": request.precision, **writer})


def labels_phase(work: Path, texts: Phase, request: DataRequest, dtype: str) -> Phase:
    corpus = [[Path(p).name, hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]] for p in request.corpus]
    teacher = {"teacher": request.teacher} if request.teacher is not None else {}  # a source teacher: as before
    return Phase(work / "labels", {"recipe": DATA_VERSION, "texts": texts.identity, "dtype": dtype, "corpus": corpus,
                                   "layers": list(request.layers), "top_k": TOP_K, **teacher})


Labeller = Callable[[list[np.ndarray], ProgressBar], DistillationSet]  # texts, the bar to report to -> their labels


def training_data(work: Path, loaded, request: DataRequest, device: str, ranks: Ranks, step: Step,  # noqa: ANN001
                  progress: Progress, teacher: GraphTeaching | None = None) -> TrainingData:
    """The labelled texts: from the work directory where an earlier run made them (whole or in part), else written
    now; each process writes its own shards. ``teacher`` (with ``request.teacher``, its identity): the bundle's graph
    writes and labels the text (opened only if some shard is still to write), else the PyTorch source."""
    texts = texts_phase(work, target_fingerprint(loaded.model, loaded.tokenizer), request)
    reusable = _complete_labels(work, texts, request)
    if reusable is not None:
        record, phase = reusable
        with step(f"reusing the training data of an earlier run ({record['tokens']:,} tokens in {work.name})"):
            data = _load_labels(phase, record["shards"])
            data = data.head(request.tokens) if data.num_tokens > request.tokens * LARGER_SLACK else data
        return TrainingData(data, phase.digest, phase.identity["dtype"], ("texts", "labels"))
    writer = _Writer(loaded.model, device)
    graph_dtype = f"graph {request.teacher['dtype']}" if teacher is not None else None
    reused = []
    record = _start(texts, ranks, lambda: {"dtype": graph_dtype or _resolve(request.precision, device)})
    reused += ["texts"] if _any_shard(texts) else []
    text_model = teacher.writer if teacher is not None else (lambda: writer(record["dtype"]))
    generated = _write_texts(texts, record, text_model, text_length(loaded.model), loaded.tokenizer, request, ranks,
                             progress)
    ordered = _order(generated + corpus_texts(loaded.tokenizer, request.corpus), request.seed)
    if len(ordered) < MIN_TEXTS:
        raise InvalidArgumentError("too little training text; raise --tokens or add --corpus files")
    dtype = graph_dtype or record["dtype"]
    labels = labels_phase(work, texts, request, dtype)
    labels_record = _start(labels, ranks, dict)
    reused += ["labels"] if _any_shard(labels) else []
    labeller = teacher.label if teacher is not None else \
        (lambda texts, bar: distill(writer(dtype), texts, request.layers, bar=bar))
    data = _write_labels(labels, labels_record, labeller, ordered, request, ranks, progress)
    return TrainingData(data, labels.digest, dtype, tuple(reused))


def _resolve(precision: str, device: str) -> str:
    if precision == "auto":
        return str(fast_dtype(device)).removeprefix("torch.")
    return PRECISIONS[precision]


def _start(phase: Phase, ranks: Ranks, choices: Callable[[], dict]) -> dict:
    """The phase's manifest: started (or kept) by the main process, then read by every process."""
    if ranks.main:
        phase.start(choices, ranks.world_size)
    ranks.barrier(f"starting the {phase.name} phase")
    return phase.record()


def _any_shard(phase: Phase) -> bool:
    return any(phase.root.glob("shard-*"))


def _complete(phase: Phase, ranks: Ranks, record: dict, **fields) -> None:
    """Every shard is in place (all processes past the barrier): the main process says so in the manifest."""
    ranks.barrier(f"ending the {phase.name} phase")
    if ranks.main:
        phase.write({**record, **fields, "complete": True})


class _Writer:
    """The target copy that writes and labels the text, made once and only when some shard needs it, on the
    process's device, in the recorded precision: bfloat16 where it measured faster (on an AMX CPU 2.5x faster
    labels than float32, the same argmax at 98% of positions, features within 1%); the target stays float32."""

    def __init__(self, model: PreTrainedModel, device: str):
        self.model, self.device = model, device
        self.copy: PreTrainedModel | None = None

    def __call__(self, dtype: str) -> PreTrainedModel:
        if self.copy is None:
            self.copy = in_precision(self.model, getattr(torch, dtype), self.device)
        return self.copy


# -- texts ------------------------------------------------------------------------------------------------------
def _write_texts(phase: Phase, record: dict, text_model: Callable[[], PreTrainedModel], length: int,
                 tokenizer, request: DataRequest, ranks: Ranks, progress: Progress) -> list[np.ndarray]:  # noqa: ANN001
    """Rounds of shards until every kind has its share; each round's plan follows from the shards before it (a
    missing shard, even of a phase once complete, is written again: the same shard). ``text_model``: makes the
    writer (the PyTorch copy, or the graph teacher's GraphWriter) on first use; ``length``: a text's planned
    tokens (data.text_length)."""
    if phase.complete(record):
        return _load_texts(phase, record["shards"])
    started = time.perf_counter()
    shares = text_shares(tokenizer)
    written: list[tuple[TextShard, int]] = []
    bar = progress(TEXTS_BAR, request.tokens // ranks.world_size)
    try:
        for _ in range(MAX_ROUNDS):
            shards = next_round(request.tokens, shares, written, length, request.shard_tokens)
            if not shards:
                break
            for shard in shards:
                if ranks.mine(shard.index) and not phase.has(shard.index):
                    texts = write_text_shard(text_model(), tokenizer, shard, request.seed)
                    phase.save_shard(shard.index, _token_arrays(texts), ranks.rank)
                    bar.update(sum(t.size for t in texts))
            ranks.barrier("writing a round of text shards")
            written += [(shard, int(phase.load_shard(shard.index)["lengths"].sum())) for shard in shards]
    finally:
        bar.close()
    _complete(phase, ranks, record, shards=len(written), tokens=sum(n for _, n in written),
              seconds=round(time.perf_counter() - started, 1))
    return _load_texts(phase, len(written))


def _token_arrays(texts: list[np.ndarray]) -> dict[str, np.ndarray]:
    flat = np.concatenate(texts) if texts else np.zeros(0, np.int64)
    return {"tokens": flat.astype(np.int64), "lengths": np.asarray([t.size for t in texts], np.int64)}


def _load_texts(phase: Phase, shards: int) -> list[np.ndarray]:
    texts: list[np.ndarray] = []
    for index in range(shards):
        shard = phase.load_shard(index)
        texts += np.split(shard["tokens"], np.cumsum(shard["lengths"])[:-1]) if shard["lengths"].size else []
    return texts


def _order(texts: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """The training order (the held-out texts are the last ones, a smaller budget's the first ones)."""
    texts = [t for t in texts if t.size > 1]
    order = np.random.default_rng([seed, ORDER_STREAM]).permutation(len(texts))
    return [texts[i] for i in order]


# -- labels -----------------------------------------------------------------------------------------------------
def label_chunks(sizes: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) text ranges of about ``shard_tokens`` tokens each (whole texts)."""
    chunks, start, tokens = [], 0, 0
    for i, size in enumerate(sizes):
        tokens += size
        if tokens >= shard_tokens:
            chunks.append((start, i + 1))
            start, tokens = i + 1, 0
    return chunks + ([(start, len(sizes))] if start < len(sizes) else [])


def _write_labels(phase: Phase, record: dict, labeller: Labeller, texts: list[np.ndarray], request: DataRequest,
                  ranks: Ranks, progress: Progress) -> DistillationSet:
    if phase.complete(record):
        return _load_labels(phase, record["shards"])
    started = time.perf_counter()
    chunks = label_chunks([t.size for t in texts], request.shard_tokens)
    mine = [(i, a, b) for i, (a, b) in enumerate(chunks) if ranks.mine(i) and not phase.has(i)]
    bar = progress(LABELS_BAR, sum(t.size for _, a, b in mine for t in texts[a:b]))
    try:
        for index, a, b in mine:
            labelled = labeller(texts[a:b], bar)
            phase.save_shard(index, labelled.arrays(), ranks.rank)
    finally:
        bar.close()
    _complete(phase, ranks, record, shards=len(chunks), tokens=sum(t.size for t in texts),
              seconds=round(time.perf_counter() - started, 1))
    return _load_labels(phase, len(chunks))


def _load_labels(phase: Phase, shards: int) -> DistillationSet:
    return DistillationSet.from_shards([phase.load_shard(index, mmap=True) for index in range(shards)])


def _complete_labels(work: Path, texts: Phase, request: DataRequest) -> tuple[dict, Phase] | None:
    """A complete labels phase that serves this request: made from the same target, seed, corpus, layers and
    recipe, with at least this many tokens (its first texts then serve; an equal budget: all of it)."""
    phase = Phase(work / "labels", {})
    record = phase.record()
    if not phase.complete(record):
        return None
    made = record["identity"]
    ours = labels_phase(work, texts, request, made.get("dtype", ""))
    if {**made, "texts": {**made.get("texts", {}), "tokens": request.tokens}} != ours.identity:
        return None
    if made["texts"].get("tokens", -1) < request.tokens:
        return None
    return record, Phase(work / "labels", made)

"""The bundle's own target graph as the teacher of `specx train-draft` (``--teacher graph``): the text and its labels
(features of the feature layers, top-K next-token probabilities) come from the ONNX graph the runtime will run, at
the bundle's dtype, instead of from the PyTorch source model. An int4 target's numbers are not the source's; on
SmolLM2 at 200k tokens a draft taught by its int4 graph measured no higher tau than one taught by the source
(docs/benchmarks.md), so the source stays the default.

    work/teacher/   teacher.onnx (+ data) with a FEATURES output and a Softmax-TopK head, its KV-commit helper,
                    entry.json (the ModelEntry and what made it); exported once, reused by a resumed run
    write(prompts)  GraphWriter: WRITE_ROWS prompts in lockstep on one batched cache, a token per row a pass
    label(texts)    GraphTeacher: per text one pass over all its tokens on a fresh cache (the runtime's
                    DecoderSession): the graph's top-K (the logits never leave it), FEATURES -> float16
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np

from specx.drafttrain.data import (MAX_TEXT_TOKENS, SAMPLING_TEMPERATURE, TOP_K, DistillationSet, ProgressBar,
                                   inverse_cdf_draw)
from specx.exporter.onnx_export import DEFAULT_OPSET
from specx.exporter.pipeline import export_model, quantized_like
from specx.graphs.contract import FEATURES
from specx.runtime.manifest import Manifest, ModelEntry
from specx.runtime.session import DecoderSession, default_session_options, open_session
from specx.runtime.tree import chain

TEACHERS = ("source", "graph")  # source: the default (measured: the int4 graph's labels gave no higher tau)
TEACHER_DIR = "teacher"
ENTRY_FILE = "entry.json"
TEACHER_ROLE = "teacher"  # not "target": no dummy attention row (ONNX Runtime's GroupQueryAttention takes several
# rows with a past at batch 1 only, and the writer steps a batch); labels are whole-text passes, which never pad
WRITE_ROWS = 32  # prompts a text-writing pass carries (one row each): the batch of GraphWriter's cache

Step = Callable[[str], ContextManager[None]]


def teacher_identity(manifest: Manifest, layers: Sequence[int], fingerprint: str) -> dict:
    """What the teacher graph depends on: the source model (``fingerprint``: phases.target_fingerprint), the bundle's
    dtype and quantization, and the feature layers read from it (the graph is exported from the source, as the
    bundle's was)."""
    return {"source": fingerprint, "dtype": manifest.dtype, "quantization": manifest.target.quantization or {},
            "layers": list(layers), "top_k": TOP_K, "role": TEACHER_ROLE}


def teacher_graph(work: Path, manifest: Manifest, loaded, adapter, layers: tuple[int, ...],  # noqa: ANN001
                  fingerprint: str, step: Step) -> tuple[Path, ModelEntry]:
    """The target graph with a FEATURES output for ``layers`` and the top-TOP_K tokens and probabilities, at the
    bundle's dtype and quantization, in work/teacher (exported now unless an earlier run left the same one there;
    labelling is 2-3x faster with the top-K in the graph than from its logits in numpy)."""
    root = work / TEACHER_DIR
    identity = teacher_identity(manifest, layers, fingerprint)
    record = root / ENTRY_FILE
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("identity") == identity:
            return root, ModelEntry.from_dict(saved["entry"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    entry = export_model(TEACHER_ROLE, loaded, adapter, root, manifest.dtype, DEFAULT_OPSET, step,
                         source=manifest.target.source, feature_layers=layers, top_k=TOP_K,
                         **quantized_like(manifest.target))
    record.write_text(json.dumps({"identity": identity, "entry": entry.to_dict()}, indent=2))
    return root, entry


class TeacherGraph:
    """The teacher graph opened once (one ONNX Runtime session and its KV-commit helper) for the labeller and the
    writer, each with caches of its own batch."""

    def __init__(self, root: Path, entry: ModelEntry, provider: str, threads: int | None = None):
        self.decoder, self.placement = open_session(root / entry.graph, provider, default_session_options(threads))
        self.committer, _ = open_session(root / entry.kv_commit, self.placement.name)
        self.contract = entry.contract
        self.context = entry.architecture.max_positions
        self.rows = min(self.context, MAX_TEXT_TOKENS)  # the longest text (prompt included)

    def session(self, batch: int = 1) -> DecoderSession:
        """A session whose cache holds the longest text, allocated once."""
        session = DecoderSession(self.decoder, self.committer, self.contract, self.placement, batch=batch,
                                 max_capacity=self.context)
        session.reserve(self.rows)
        return session


class GraphTeacher:
    """Labels texts with the teacher graph, one text per pass on a fresh cache."""

    def __init__(self, graph: TeacherGraph):
        self.session = graph.session()
        self.feature_width = graph.contract.feature_width

    def label(self, texts: Sequence[np.ndarray], bar: ProgressBar) -> DistillationSet:
        """``distill``'s labels, from the graph: the features of every position and its top-K probabilities."""
        texts = [t for t in texts if t.size > 1]
        offsets = np.concatenate([[0], np.cumsum([t.size for t in texts])]).astype(np.int64)
        total = int(offsets[-1])
        features = np.empty((total, self.feature_width), np.float16)
        top_ids = np.empty((total, TOP_K), np.int32)
        top_probs = np.empty((total, TOP_K), np.float16)
        for text, at in zip(texts, offsets[:-1]):
            rows = slice(int(at), int(at) + text.size)
            top_ids[rows], top_probs[rows], features[rows] = self._pass(text)
            bar.update(text.size)
        return DistillationSet(list(texts), features, top_ids, top_probs, offsets)

    def _pass(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-K ids (seq, K), their probabilities (seq, K) and the features (seq, F) of one text on an empty cache
        (nothing is committed)."""
        session = self.session
        session.reset()
        session.reserve(text.size)
        run = chain(text.size)
        ids, probs = session.forward_top(text.reshape(1, -1).astype(np.int64), run.positions(0),
                                         run.attention_mask(0))  # (1, seq, K) each
        return ids[0], probs[0], session.outputs[FEATURES][0]


class GraphWriter:
    """Writes the training text with the teacher graph: ``rows`` prompts in lockstep on one batched cache, one
    token per row a pass; greedy rows take the graph's argmax, sampled rows data.inverse_cdf_draw (torch's
    generator, seeded per shard as for the PyTorch writer). Stands in for the PyTorch model in data._continue
    (``config`` and ``generate_rows``)."""

    def __init__(self, graph: TeacherGraph, config, rows: int = WRITE_ROWS):  # noqa: ANN001  (a transformers config)
        self.config = config  # the source's (data.text_length and data._continue read its context)
        self.rows = rows
        self.graph = graph
        self._sessions: dict[int, DecoderSession] = {}

    def generate_rows(self, prompts: Sequence[Sequence[int]], new: int, greedy: bool, pad: int) -> list[list[int]]:
        """``new`` tokens after each prompt, ``rows`` prompts at a time."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.rows):
            out += self._batch(prompts[start:start + self.rows], new, greedy, pad).tolist()
        return out

    def _batch(self, prompts: Sequence[Sequence[int]], new: int, greedy: bool, pad: int) -> np.ndarray:
        """Right-aligned at column 0, so every row's positions are its columns (ONNX Runtime's GroupQueryAttention
        takes the rotary positions of a first pass from the columns, not from position_ids): the columns all
        prompts share in one pass, then one column a pass, each row feeding its prompt's token while it has one
        and its own last token after; a row's tokens from its prompt's end are its continuation. (batch, new)."""
        batch = len(prompts)
        lengths = np.asarray([len(p) for p in prompts])
        last = int(lengths.max()) + new - 1  # the columns fed: 0 .. last - 1
        session = self._sessions.get(batch) or self._sessions.setdefault(batch, self.graph.session(batch))
        session.reset()
        session.reserve(last)
        ids = np.full((batch, last), pad, np.int64)  # (batch, columns): prompts, then what each row writes
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        # the columns every row knows the next token of, in one pass where the graph takes several rows at a batch
        # over 1 (GroupQueryAttention: only without a past, which a static-shape graph always has)
        shared = 0 if self.graph.contract.static_shapes else int(lengths.min()) - 1
        if shared > 0:
            run = chain(shared)
            session.forward_tokens(ids[:, :shared], np.repeat(run.positions(0), batch, axis=0),
                                   np.repeat(run.attention_mask(0), batch, axis=0))
            session.commit()
        for column in range(shared, last):
            token, position = ids[:, column:column + 1], np.full((batch, 1), column, np.int64)
            seen = np.ones((batch, 1, 1, column + 1), bool)
            if greedy:
                chosen = session.forward_tokens(token, position, seen)[:, 0]  # (batch,)
            else:
                chosen = inverse_cdf_draw(session.forward(token, position, seen)[:, 0], SAMPLING_TEMPERATURE)
            session.commit()
            if column + 1 < last:
                writing = column + 1 >= lengths  # rows past their prompt: the next column is theirs to write
                ids[writing, column + 1] = chosen[writing]
        out = np.empty((batch, new), np.int64)
        for row, length in enumerate(lengths):
            written = np.append(ids[row, length:], chosen[row])  # columns length .. last - 1, then the last choice
            out[row] = written[:new]
        return out


class GraphTeaching:
    """What the data phases get for ``--teacher graph``: the teacher's identity (in both phases' identities), and,
    made on first use (a run whose shards all exist opens no graph), its text writer and its labeller."""

    def __init__(self, identity: dict, open_graph: Callable[[], TeacherGraph], config):  # noqa: ANN001
        self.identity = identity
        self._open_graph, self._config = open_graph, config
        self._graph: TeacherGraph | None = None
        self._writer: GraphWriter | None = None
        self._labeller: GraphTeacher | None = None

    @property
    def graph(self) -> TeacherGraph:
        self._graph = self._graph or self._open_graph()
        return self._graph

    def writer(self) -> GraphWriter:
        self._writer = self._writer or GraphWriter(self.graph, self._config)
        return self._writer

    def label(self, texts: Sequence[np.ndarray], bar: ProgressBar) -> DistillationSet:
        self._labeller = self._labeller or GraphTeacher(self.graph)
        return self._labeller.label(texts, bar)

"""The bundle's own target graph as the teacher of `specx train-draft` (``--teacher graph``): the labels (features
of the feature layers, top-K next-token probabilities) come from the ONNX graph the runtime will run, at the
bundle's dtype, instead of from the PyTorch source model. An int4 target's features and distributions are not the
source's: a draft trained on the graph's own agrees with what it will meet at decoding time.

    work/teacher/   target.onnx (+ data) with a FEATURES output, its KV-commit helper, entry.json (the ModelEntry
                    and what made it); exported once, reused by a resumed run
    label(texts)    per text one pass over all its tokens on a fresh cache (the runtime's DecoderSession): the
                    graph's own Softmax -> TopK(TOP_K) outputs (the logits never leave it), FEATURES -> float16
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np

from specx.drafttrain.data import TOP_K, DistillationSet, ProgressBar
from specx.exporter.onnx_export import DEFAULT_OPSET
from specx.exporter.pipeline import export_model
from specx.graphs.contract import FEATURES
from specx.graphs.quantize import ACCURACY_LEVEL, BLOCK_SIZE
from specx.runtime.manifest import Manifest, ModelEntry
from specx.runtime.session import DecoderSession, default_session_options, open_session
from specx.runtime.tree import chain

TEACHERS = ("auto", "graph", "source")
TEACHER_DIR = "teacher"
ENTRY_FILE = "entry.json"

Step = Callable[[str], ContextManager[None]]


def resolve_teacher(teacher: str, manifest: Manifest) -> str:
    """auto: the graph where it computes other numbers than the source (weight-quantized targets: int8, int4 and
    their fp16 forms), else the source model (the same numbers within export's parity, labelled faster in batches)."""
    if teacher == "auto":
        return "graph" if manifest.target.quantization else "source"
    return teacher


def teacher_identity(manifest: Manifest, layers: Sequence[int], fingerprint: str) -> dict:
    """What the teacher graph depends on: the source model (``fingerprint``: phases.target_fingerprint), the bundle's
    dtype and quantization, and the feature layers read from it (the graph is exported from the source, as the
    bundle's was)."""
    return {"source": fingerprint, "dtype": manifest.dtype, "quantization": manifest.target.quantization or {},
            "layers": list(layers), "top_k": TOP_K}


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
    quantization = manifest.target.quantization or {}
    entry = export_model("target", loaded, adapter, root, manifest.dtype, DEFAULT_OPSET, step,
                         source=manifest.target.source, feature_layers=layers,
                         accuracy_level=quantization.get("accuracy_level", ACCURACY_LEVEL),
                         block_size=quantization.get("block_size", BLOCK_SIZE), top_k=TOP_K)
    record.write_text(json.dumps({"identity": identity, "entry": entry.to_dict()}, indent=2))
    return root, entry


class GraphTeacher:
    """Labels texts with the teacher graph, one text per pass on a fresh cache."""

    def __init__(self, root: Path, entry: ModelEntry, provider: str, threads: int | None = None):
        session, placement = open_session(root / entry.graph, provider, default_session_options(threads))
        committer, _ = open_session(root / entry.kv_commit, placement.name)
        self.session = DecoderSession(session, committer, entry.contract, placement)
        self.feature_width = entry.contract.feature_width

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
        session.reserve(text.size + session.contract.spare_rows)
        run = chain(text.size)
        ids, probs = session.forward_top(text.reshape(1, -1).astype(np.int64), run.positions(0),
                                         run.attention_mask(0))  # (1, seq, K) each
        return ids[0], probs[0], session.outputs[FEATURES][0]

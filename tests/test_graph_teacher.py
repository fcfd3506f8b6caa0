"""`specx train-draft --teacher graph`: the labels (features, top-K distributions) come from the bundle's own target
graph. On an fp32 bundle they are the source model's; on an int4 bundle the draft trained on them stays lossless."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specx.drafttrain.data import (SAMPLING_TEMPERATURE, InverseCdfSampling, ProgressBar, _continue, distill,
                                   inverse_cdf_draw)
from specx.drafttrain.phases import target_fingerprint
from specx.drafttrain.pipeline import TrainDraftRequest, train_draft
from specx.drafttrain.teacher import GraphTeacher, GraphWriter, TeacherGraph, teacher_graph
from specx.drafttrain.train import default_feature_layers
from specx.errors import InvalidArgumentError
from specx.exporter.adapters import adapter_for
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.exporter.sources import load_source
from specx.runtime.bundle import Bundle
from specx.runtime.generator import Generator
from tests import tiny_models

TRAIN_TOKENS = 3000
DRAFT_VOCAB = 200
EPOCHS = 10
PROMPTS = ("def f1", "the quick brown fox", "one two three")


def _step(_: str):
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def predictable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_trained_llama(tmp_path_factory.mktemp("hf") / "tiny-llama-trained")


def _bundle(root: Path, source: Path, dtype: str) -> Path:
    out = root / f"tiny-{dtype}"
    export_bundle(ExportRequest(str(source), draft="none", output=out, dtype=dtype, ngram_tokens=0))
    return out


@pytest.fixture(scope="module")
def fp32_teacher(predictable_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The source, its feature layers and the teacher graph of an fp32 bundle (the same numbers as the source)."""
    root = tmp_path_factory.mktemp("fp32-teacher")
    bundle = Bundle.load(_bundle(root, predictable_dir, "fp32"))
    loaded = load_source(str(predictable_dir), "fp32")
    adapter = adapter_for(loaded.model.config)
    layers = default_feature_layers(adapter.spec.num_layers)
    fingerprint = target_fingerprint(loaded.model, loaded.tokenizer)
    graph_dir, entry = teacher_graph(root / "work", bundle.manifest, loaded, adapter, layers, fingerprint, _step)
    again = teacher_graph(root / "work", bundle.manifest, loaded, adapter, layers, fingerprint, _step)
    assert again == (graph_dir, entry) and (graph_dir / entry.graph).exists()  # exported once, then reused
    return SimpleNamespace(loaded=loaded, vocab=adapter.spec.vocab_size, layers=layers,
                           graph=TeacherGraph(graph_dir, entry, "cpu"))


def test_the_graph_teacher_of_an_fp32_bundle_labels_what_the_source_does(fp32_teacher: SimpleNamespace):
    loaded, layers = fp32_teacher.loaded, fp32_teacher.layers
    rng = np.random.default_rng(1)
    texts = [rng.integers(3, fp32_teacher.vocab, n).astype(np.int64) for n in (9, 1, 23, 40)]
    graph = GraphTeacher(fp32_teacher.graph).label(texts, ProgressBar())
    source = distill(loaded.model, texts, layers)
    assert np.array_equal(graph.offsets, source.offsets) and len(graph.tokens) == 3  # the 1-token text is dropped
    np.testing.assert_allclose(graph.features.astype(np.float32), source.features.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert np.mean(graph.top_ids == source.top_ids) > 0.99  # ties among the tail may swap
    assert np.array_equal(graph.top_ids[:, 0], source.top_ids[:, 0])
    np.testing.assert_allclose(graph.top_probs.astype(np.float32), source.top_probs.astype(np.float32), atol=2e-3)


def test_an_unknown_teacher_is_refused(predictable_dir: Path, tmp_path: Path):
    with pytest.raises(InvalidArgumentError, match="--teacher"):
        train_draft(TrainDraftRequest(_bundle(tmp_path, predictable_dir, "int4"), tokens=100, teacher="int4"), _step)


def test_a_draft_taught_by_an_int4_graph_is_lossless_and_says_so(predictable_dir: Path, tmp_path: Path):
    out = _bundle(tmp_path, predictable_dir, "int4")
    work = tmp_path / "work"
    train_draft(TrainDraftRequest(out, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=EPOCHS, work_dir=work,
                                  teacher="graph"), _step)
    training = Bundle.load(out).manifest.draft.training
    assert training["data_precision"] == "graph int4"
    labels = json.loads((work / "labels" / "manifest.json").read_text())["identity"]
    assert labels["teacher"]["dtype"] == "int4" and labels["teacher"]["quantization"]["bits"] == 4
    gen = Generator.load(out, provider="cpu")
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=20, mode="autoregressive", ignore_eos=True)
        spec = gen.generate(prompt, max_new_tokens=20, mode="speculative", ignore_eos=True, tree_budget=1,
                            tree_depth=1)
        assert spec.tokens == plain.tokens and spec.stats.draft_calls > 0, prompt
    texts = json.loads((work / "texts" / "manifest.json").read_text())
    assert texts["identity"]["writer"]["dtype"] == "int4" and texts["dtype"] == "graph int4"  # the graph wrote them
    # the source as teacher: other texts and labels (phases whose identities name no graph)
    train_draft(TrainDraftRequest(out, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=1, work_dir=work,
                                  teacher="source"), _step)
    assert Bundle.load(out).manifest.draft.training["data_precision"] != "graph int4"
    for phase, key in (("texts", "writer"), ("labels", "teacher")):
        assert key not in json.loads((work / phase / "manifest.json").read_text())["identity"]


def test_the_graph_writer_continues_a_batch_as_the_source_does(fp32_teacher: SimpleNamespace):
    """Greedy rows of different prompt lengths, written in lockstep on one batched cache, are the source model's
    greedy continuations (left-padded in a batch by transformers); sampled rows draw what InverseCdfSampling draws
    from the same torch generator."""
    loaded = fp32_teacher.loaded
    writer = GraphWriter(fp32_teacher.graph, loaded.model.config, rows=3)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, fp32_teacher.vocab, n).tolist() for n in (5, 1, 19, 2)]  # 3 + 1 rows a batch
    graph = _continue(writer, loaded.tokenizer, prompts, 30, greedy=True)
    source = _continue(loaded.model, loaded.tokenizer, prompts, 30, greedy=True)
    assert [t.tolist() for t in graph] == [t.tolist() for t in source]
    logits = rng.standard_normal((4, fp32_teacher.vocab)).astype(np.float32) * 3
    torch.manual_seed(7)
    drawn = inverse_cdf_draw(logits, SAMPLING_TEMPERATURE)
    torch.manual_seed(7)
    scores = InverseCdfSampling(SAMPLING_TEMPERATURE)(None, torch.from_numpy(logits))
    assert drawn.tolist() == scores.argmax(dim=-1).tolist()
    torch.manual_seed(3)
    sampled = _continue(writer, loaded.tokenizer, prompts, 30, greedy=False)
    assert [t.size for t in sampled] == [t.size for t in graph] and any(
        a.tolist() != b.tolist() for a, b in zip(sampled, graph))

"""Verify passes padded to fixed bucket sizes (the shapes CUDA graphs capture): exactly the unpadded results."""

from __future__ import annotations

import numpy as np
import pytest

from specx.exporter.validate import random_tree
from specx.runtime import Generator
from specx.runtime import decoding
from specx.runtime.decoding import feed
from specx.runtime.tree import DRAFT_BUCKETS, TREE_BUCKETS, bucket_size, padded_pass
from tests.helpers import open_target


def test_bucket_size():
    assert bucket_size(1, TREE_BUCKETS, 100) == 1
    assert bucket_size(5, TREE_BUCKETS, 100) == 8
    assert bucket_size(9, TREE_BUCKETS, 100) == 16
    assert bucket_size(9, TREE_BUCKETS, 12) == 9  # no bucket fits the rows left: unpadded
    assert bucket_size(70, TREE_BUCKETS, 200) == 70


def test_a_padded_pass_gives_the_unpadded_logits_and_cache(llama_bundle):
    rng = np.random.default_rng(0)
    tree = random_tree(11, rng)
    session = open_target(llama_bundle)
    tokens = rng.integers(0, session.contract.vocab_size, tree.size).astype(np.int64)
    prefix = rng.integers(0, session.contract.vocab_size, 9).astype(np.int64)
    results = []
    for size in (tree.size, 16, 32):
        session.reset()
        feed(session, prefix)
        logits = session.forward(*padded_pass(tree, tokens, 9, size))[0, :tree.size]
        path = [int(n) for n in tree.path(tree.size - 1)]
        session.commit(path)
        cache = [v.numpy()[:, :, :session.past_len].copy() for v in session._cache]
        results.append((logits, cache))
    for logits, cache in results[1:]:
        np.testing.assert_allclose(logits, results[0][0], atol=1e-5)
        for got, want in zip(cache, results[0][1]):
            np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "draft_choice": "top"},
                                      {"temperature": 1.0, "draft_choice": "sample"}])
def test_padded_decoding_equals_unpadded(llama_self_bundle, mode, sampling, monkeypatch):
    """Every mode, both acceptance rules: the same tokens (same seed) and the same cache, to the context's end."""
    plain_gen = Generator.load(llama_self_bundle, provider="cpu")
    padded_gen = Generator.load(llama_self_bundle, provider="cpu", pad_trees=True)
    assert padded_gen.tree_buckets == TREE_BUCKETS and plain_gen.tree_buckets == ()
    ids = plain_gen.bundle.tokenizer.encode("one two three").ids
    new = plain_gen.max_positions - len(ids)
    kwargs = dict(max_new_tokens=new, mode=mode, ignore_eos=True, seed=11, tree_budget=6, tree_depth=3, **sampling)
    if mode == "ngram":
        kwargs.pop("draft_choice", None)
    plain = plain_gen.generate(ids, **kwargs).tokens
    sizes = []
    verify = decoding.verify

    def recording_verify(target, drafted, greedy=False, size=None):
        sizes.append((drafted.tokens.size, size))
        return verify(target, drafted, greedy, size)

    monkeypatch.setattr(decoding, "verify", recording_verify)
    padded = padded_gen.generate(ids, **kwargs).tokens
    assert padded == plain and len(padded) == new
    assert any(size and size > n for n, size in sizes)  # passes really were padded
    rows = plain_gen.target.past_len
    assert padded_gen.target.past_len == rows
    for got, want in zip(padded_gen.target._cache, plain_gen.target._cache):
        np.testing.assert_allclose(got.numpy()[:, :, :rows], want.numpy()[:, :, :rows], atol=1e-5)


def test_fixed_buffer_passes_equal_ordinary_passes(tmp_path, llama_dir):
    """cuda_graphs on a static-shape (fp16) bundle: every bucketed pass runs on buffers bound once (captured on
    CUDA; on the CPU the same passes without capture): the same tokens as ordinary passes, in every mode."""
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1", output=tmp_path / "fp16",
                                      dtype="fp16", ngram_tokens=0))
    plain_gen = Generator.load(out, provider="cpu")
    fixed_gen = Generator.load(out, provider="cpu", cuda_graphs=True)
    assert fixed_gen.target.fixed_buckets == frozenset(TREE_BUCKETS)
    for mode in ("autoregressive", "speculative", "staged"):
        plain = plain_gen.generate("one two", max_new_tokens=40, mode=mode, ignore_eos=True).tokens
        fixed = fixed_gen.generate("one two", max_new_tokens=40, mode=mode, ignore_eos=True).tokens
        assert fixed == plain, mode
    assert {key[0] for key in fixed_gen.target._fixed} >= {1, 8}  # one-token steps and padded trees ran fixed
    assert not fixed_gen.target._capture  # nothing to capture on the CPU
    # the draft's passes (first calls and tree levels of varying rows) ran padded to its buckets, on fixed buffers
    assert fixed_gen.draft.fixed_buckets == frozenset(DRAFT_BUCKETS)
    assert {key[0] for key in fixed_gen.draft._fixed} >= {1, 2, 4} and not plain_gen.draft._fixed


class _RecordingSession:
    """An ONNX Runtime session that records each run's gpu_graph_id."""

    def __init__(self, session):
        self.session, self.graph_ids = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, io, options=None):
        self.graph_ids.append(options.get_run_config_entry("gpu_graph_id") if options else None)
        return self.session.run_with_iobinding(io, options)


def test_a_capturing_session_never_captures_an_unfixed_pass(tmp_path, llama_dir):
    """ONNX Runtime captures a run without gpu_graph_id as graph 0 in a CUDA-graph session and replays it whatever
    the shapes: passes off the fixed buffers (prefill, lengths without a bucket) must say -1; fixed ones their id."""
    from specx.exporter.pipeline import ExportRequest, export_bundle
    from specx.runtime.bundle import Bundle
    from specx.runtime.generator import _decoder
    from specx.runtime.session import DecoderSession

    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "fp16", dtype="fp16",
                                      ngram_tokens=0))
    bundle = Bundle.load(out)
    built = _decoder(bundle, bundle.manifest.target, "cpu")
    recorder = _RecordingSession(built._decoder)
    session = DecoderSession(recorder, built._committer, built.contract, built.placement, fixed_buckets=(1,),
                             capture=True)  # as on CUDA; the CPU ignores the entries
    session.reserve(32)
    feed(session, np.arange(5, dtype=np.int64))  # a 5-row prefill: no bucket
    feed(session, np.array([7], dtype=np.int64))  # a one-token step: bucket 1
    feed(session, np.array([8], dtype=np.int64))
    assert recorder.graph_ids == ["-1", "1", "1"]


def test_cuda_graphs_need_a_static_shape_bundle(llama_bundle):
    from specx.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="static-shape"):
        Generator.load(llama_bundle, provider="cpu", cuda_graphs=True)

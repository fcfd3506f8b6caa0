"""Exact chains on int8-activation targets: with attention run on two rows at least (a dummy row inside the graph at
block 32; one-row passes padded by the runtime at larger blocks), a chain pass gives each row, bit for bit, what
one-token steps give it, and a target whose trees are not exact speculates with chains instead of decoding
plainly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from specx.errors import InvalidArgumentError
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime import Generator, bench
from specx.runtime.decoding import feed
from specx.runtime.tree import chain
from tests.helpers import assert_first_two_tokens_follow_the_model, open_target

PROMPTS = ("one two three", "def f1(x):", "the quick brown fox")
PAST = 30  # committed rows before the chain: longer than a SIMD width, so the one-row kernels differ


@pytest.fixture(scope="module")
def chains_only_bundle(int4_bundle, tmp_path_factory) -> Path:
    """The int4 bundle as a real model's export records it: trees not exact, chains exact (the tiny model's trees
    happen to measure exact; SmolLM2-135M's measured 0.5-2.4 logits apart)."""
    copy = tmp_path_factory.mktemp("b") / "chains"
    shutil.copytree(int4_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["parity"]["row_consistent"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_int8_activation_targets_pad_attention_in_the_graph(int4_bundle):
    """Block 32 (MatMulNBits computes every row alike): the graph runs attention on one dummy row more, so the runtime
    pads nothing and a one-token step is still one row through the matmuls."""
    manifest = json.loads((int4_bundle / "manifest.json").read_text())
    target, draft = manifest["target"], manifest["draft"]
    assert target["contract"]["padded_attention"] is True and not draft["contract"]["padded_attention"]
    assert target["contract"]["min_rows"] == 1 and target["contract"]["row_multiple"] == 1
    graph = onnx.load(str(int4_bundle / "target.onnx"), load_external_data=False)
    layers = target["architecture"]["num_layers"]
    assert sum(n.op_type == "Pad" and "/attn/pad_" in n.name for n in graph.graph.node) == layers
    assert sum(n.name.endswith("/attn/pad/Slice") for n in graph.graph.node) == layers
    cos = next(i for i in graph.graph.initializer if i.name == "model.rotary.cos_cache")
    assert cos.dims[0] == target["architecture"]["max_positions"] + 1  # the dummy row at the end reaches one past
    assert target["parity"]["chains_exact"] is True and target["parity"]["chain_vs_steps"] == 0.0
    session = open_target(int4_bundle)
    assert session.contract.padded_rows(1) == 1 and session.contract.spare_rows == 1


def test_larger_blocks_pad_whole_passes_in_the_runtime(llama_dir, tmp_path):
    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "b64", dtype="int4",
                                      ngram_tokens=0, quant_block=64))
    contract = json.loads((out / "manifest.json").read_text())["target"]["contract"]
    assert contract["min_rows"] == 2 and contract["row_multiple"] == 2 and not contract["padded_attention"]


@pytest.mark.parametrize("dtype,accuracy", [("fp32", None), ("int4", 0)])
def test_exact_float_compute_keeps_one_row_attention(llama_dir, tmp_path, dtype, accuracy):
    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / dtype, dtype=dtype,
                                      ngram_tokens=0, quant_accuracy=accuracy))
    parity = json.loads((out / "manifest.json").read_text())["target"]
    assert parity["contract"]["min_rows"] == 1
    assert parity["parity"]["row_consistent"] is True and parity["parity"]["chains_exact"] is True


@pytest.mark.parametrize("block", [32, 64])
def test_chain_pass_rows_are_bitwise_one_token_steps(llama_dir, tmp_path, block):
    """Every row of chain passes of 2..6 tokens after a 30-row past == the same tokens fed one at a time, to the bit
    (logits and the cache rows written); at block 64 MatMulNBits computes an odd last row with its one-row kernel,
    so passes are padded to an even number of rows too."""
    bundle = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "q", dtype="int4",
                                         ngram_tokens=0, quant_block=block))
    session = open_target(bundle)
    assert session.contract.row_multiple == (2 if block > 32 else 1)
    rng = np.random.default_rng(0)
    vocab = session.contract.vocab_size
    prefix = rng.integers(0, vocab, PAST).astype(np.int64)
    feed(session, prefix)
    for n in range(2, 7):
        tokens = rng.integers(0, vocab, n).astype(np.int64)
        session.rewind(PAST)
        run = chain(n)
        passed = session.forward(tokens[None], run.positions(PAST), run.attention_mask(PAST))[0]  # (n, vocab)
        session.commit()
        cache = [v.numpy()[:, :, PAST:PAST + n].copy() for v in session._cache]  # (batch, kv_heads, n, head_dim)
        session.rewind(PAST)
        stepped = np.stack([feed(session, tokens[i:i + 1]) for i in range(n)])  # (n, vocab)
        assert np.array_equal(passed, stepped), (n, float(np.abs(passed - stepped).max()))
        for before, value in zip(cache, session._cache):
            assert np.array_equal(before, value.numpy()[:, :, PAST:PAST + n])


@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
def test_a_chains_only_target_speculates_with_chains_losslessly(chains_only_bundle, mode):
    gen = Generator.load(chains_only_bundle, provider="cpu")
    assert gen.draft_kind.chains_only
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode="autoregressive").tokens
        fast = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode=mode, tree_depth=4)
        assert fast.tokens == plain
        assert fast.stats.tree_budget == fast.stats.tree_depth == 4


def test_a_chains_only_target_to_the_end_of_its_context(chains_only_bundle):
    """The spare row past the last pass still fits the cache at the end of the context."""
    gen = Generator.load(chains_only_bundle, provider="cpu")
    prompt = PROMPTS[0]
    new = gen.max_positions - len(gen.bundle.tokenizer.encode(prompt).ids)
    plain = gen.generate(prompt, max_new_tokens=new, mode="autoregressive", ignore_eos=True)
    fast = gen.generate(prompt, max_new_tokens=new, mode="speculative", ignore_eos=True, tree_depth=5)
    assert fast.tokens == plain.tokens and len(plain.tokens) == new


def test_a_chains_only_target_turns_trees_into_chains(chains_only_bundle):
    gen = Generator.load(chains_only_bundle, provider="cpu")
    auto = gen.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert auto.stats.mode == "ngram" and auto.stats.tree_budget == auto.stats.tree_depth == 1  # CHAINS_ONLY_DEPTH
    with pytest.raises(InvalidArgumentError, match="chains only"):
        gen.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True, mode="speculative", tree_budget=8, tree_depth=4)
    assert bench.supported_modes(gen) == ["speculative", "staged", "ngram"]
    pool = bench.candidates(["speculative"], sampling=False, chains_only=True)
    assert pool and all(c.tree_budget == c.tree_depth for c in pool)
    assert any(c.tree_budget > c.tree_depth for c in bench.candidates(["speculative"], sampling=False))


def test_padded_rows():
    from specx.graphs.contract import GraphContract

    plain = GraphContract.decoder(2, 2, 16, 100, "float32")
    paired = GraphContract.decoder(2, 2, 16, 100, "float32", min_rows=2, row_multiple=2)
    at_least_two = GraphContract.decoder(2, 2, 16, 100, "float32", min_rows=2)
    assert [plain.padded_rows(n) for n in (1, 2, 3)] == [1, 2, 3] and plain.spare_rows == 0
    assert [at_least_two.padded_rows(n) for n in (1, 2, 3, 4)] == [2, 2, 3, 4] and at_least_two.spare_rows == 1
    assert [paired.padded_rows(n) for n in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 6] and paired.spare_rows == 1
    assert GraphContract.from_dict(paired.to_dict()) == paired
    in_graph = GraphContract.decoder(2, 2, 16, 100, "float32", padded_attention=True)
    assert [in_graph.padded_rows(n) for n in (1, 2, 3)] == [1, 2, 3] and in_graph.spare_rows == 1
    assert in_graph.padded and paired.padded and not plain.padded
    assert GraphContract.from_dict(in_graph.to_dict()) == in_graph
    older = {k: v for k, v in in_graph.to_dict().items() if k != "padded_attention"}  # manifests before the field
    assert GraphContract.from_dict(older).padded_attention is False


@pytest.mark.parametrize("draft_choice", ["top", "sample"])
def test_sampled_chains_follow_the_model(chains_only_bundle, draft_choice):
    """Sampling on a chains-only target (rule A over top-token chains, rule B over drawn ones): the first two tokens
    follow plain sampling's exact distribution."""
    gen = Generator.load(chains_only_bundle, provider="cpu")
    assert_first_two_tokens_follow_the_model(gen, "speculative", 7000, draft_choice=draft_choice, tree_budget=3,
                                             temperature=1.0)


def test_a_padded_pass_fills_the_cache_to_its_last_row(int4_bundle):
    """A one-row pass that ends at the cache's last row runs padded into the spare row (not a CapacityError), and
    gives what the same step gives with room to spare."""
    from specx.runtime.bundle import Bundle
    from specx.runtime.generator import _decoder
    from specx.runtime.session import CACHE_BLOCK

    tokens = np.random.default_rng(3).integers(0, 300, CACHE_BLOCK).astype(np.int64)
    roomy = open_target(int4_bundle)  # reserves more rows
    feed(roomy, tokens[:-1])
    expected = feed(roomy, tokens[-1:])
    bundle = Bundle.load(int4_bundle)
    session = _decoder(bundle, bundle.manifest.target, "cpu")
    session.reserve(CACHE_BLOCK)
    assert session.capacity == CACHE_BLOCK
    feed(session, tokens[:-1])
    assert np.array_equal(feed(session, tokens[-1:]), expected) and session.past_len == CACHE_BLOCK

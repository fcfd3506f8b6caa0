"""Fused graphs, the static KV cache, capacity limits and int8/int4 targets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from specx.errors import CapacityError, InvalidArgumentError
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime import Generator
from specx.runtime.decoding import feed
from specx.runtime.session import CACHE_BLOCK
from specx.runtime.tree import build_tree
from tests import tiny_models
from tests.helpers import open_target
from tests.test_torch_free import _run

MAX_NODES_PER_LAYER = 13
# What a fused decoder may contain; the dynamo export's Concat/Transpose/Expand/Pow/ReduceMean are gone.
FUSED_OPS = {"Gather", "Add", "Where", "Shape", "Cast", "Sub", "Expand", "LayerNormalization",
             "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "MatMul",
             "MatMulNBits", "FusedMatMul", "Split", "RotaryEmbedding", "GroupQueryAttention", "QuickGelu", "FastGelu",
             "Mul", "ArgMax"}  # ArgMax: the next_tokens output greedy decoding reads
PROMPTS = ("one two three", "def f1(x):", "the quick brown fox")


def _graph(bundle: Path, role: str = "target") -> onnx.ModelProto:
    return onnx.load(str(bundle / f"{role}.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, llama_dir) -> Path:
    return export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path_factory.mktemp("b") / "q8",
                                       dtype="int8", ngram_tokens=0))


@pytest.mark.parametrize("name", ["gpt2_bundle", "llama_bundle", "llama_hd8_bundle"])
def test_graph_is_fused(request, name):
    bundle = request.getfixturevalue(name)
    graph = _graph(bundle)
    layers = json.loads((bundle / "manifest.json").read_text())["target"]["architecture"]["num_layers"]
    ops = Counter(node.op_type for node in graph.graph.node)
    assert set(ops) <= FUSED_OPS, set(ops) - FUSED_OPS
    assert ops["GroupQueryAttention"] == layers
    per_layer = sum(1 for n in graph.graph.node if n.name.startswith("/model/layers.")) / layers
    assert per_layer <= MAX_NODES_PER_LAYER
    assert all(n.name for n in graph.graph.node)  # every node named by the rule


@pytest.mark.parametrize("name", ["gpt2_bundle", "llama_bundle", "llama_hd8_bundle"])
def test_parity_with_pytorch_is_recorded(request, name):
    """gpt2 (MHA, tied), llama (GQA, untied; rotary in the attention kernel), llama (MHA, tied, head_dim 8; rotary
    in RotaryEmbedding nodes): validated at export on a random tree after a past; the draft too."""
    manifest = json.loads((request.getfixturevalue(name) / "manifest.json").read_text())
    for entry in filter(None, (manifest["target"], manifest["draft"])):
        parity = entry["parity"]
        assert 0 < parity["max_abs_logit_diff"] <= parity["tolerance"]


def test_rotary_placement_follows_the_head_size(llama_bundle, llama_hd8_bundle):
    fused = Counter(n.op_type for n in _graph(llama_bundle).graph.node)
    separate = Counter(n.op_type for n in _graph(llama_hd8_bundle).graph.node)
    assert fused["RotaryEmbedding"] == 0 and fused["Split"] == 0
    assert separate["RotaryEmbedding"] == 2 * separate["GroupQueryAttention"]


@pytest.mark.parametrize("shape", [(4, 4), (6, 3)])
def test_separate_rotary_speculation_equals_plain_decoding(llama_hd8_bundle, shape):
    gen = Generator.load(llama_hd8_bundle, provider="cpu")
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode="autoregressive").tokens
        fast = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode="speculative", tree_budget=shape[0],
                            tree_depth=shape[1]).tokens
        assert fast == plain


def test_cache_buffers_stay_put_while_generating(gpt2_same_draft_bundle):
    gen = Generator.load(gpt2_same_draft_bundle, provider="cpu")
    gen.generate("one two", max_new_tokens=40, ignore_eos=True, mode="speculative")  # sizes the caches
    before = [v.data_ptr() for v in gen.target._cache + gen.draft._cache]
    result = gen.generate("three four", max_new_tokens=30, ignore_eos=True, mode="speculative")
    after = [v.data_ptr() for v in gen.target._cache + gen.draft._cache]
    assert result.stats.new_tokens == 30 and before == after  # no reallocation, no growth, no copies


def test_capacity_overflow_is_an_error_before_any_work(llama_bundle):
    gen = Generator.load(llama_bundle, provider="cpu", max_context=24)
    with pytest.raises(CapacityError, match="max-context"):
        gen.generate("one two three", max_new_tokens=30)
    assert gen.target.calls == 0
    with pytest.raises(InvalidArgumentError, match="max_context"):
        Generator.load(llama_bundle, provider="cpu", max_context=tiny_models.CONTEXT + 1)
    assert len(gen.generate("one two three", max_new_tokens=8, ignore_eos=True).tokens) == 8


def test_a_pass_beyond_the_reserved_cache_is_an_error(llama_bundle):
    """A wide tree (every node at depth 1: positions stay in the model's context) that needs more rows than
    reserved."""
    session = open_target(llama_bundle)
    session.reset()
    feed(session, np.arange(4, dtype=np.int64))
    star = build_tree([-1] + [0] * (session.capacity - session.past_len))
    tokens = np.zeros((1, star.size), dtype=np.int64)
    with pytest.raises(CapacityError, match="overflows"):
        session.forward(tokens, star.positions(session.past_len), star.attention_mask(session.past_len))
    assert session.calls == 1


def test_the_cache_is_sized_by_the_generation_and_capped_by_max_context(llama_bundle):
    capped = Generator.load(llama_bundle, provider="cpu", max_context=40)
    capped.generate("one two", max_new_tokens=30, ignore_eos=True, mode="autoregressive")
    long = Generator.load(llama_bundle, provider="cpu")
    long.generate("one two", max_new_tokens=140, ignore_eos=True, mode="autoregressive")
    assert capped.target.capacity == CACHE_BLOCK < long.target.capacity


@pytest.mark.parametrize("name,bits", [("int4_bundle", 4), ("int8_bundle", 8)])
def test_quantized_target_graph(request, name, bits):
    bundle = request.getfixturevalue(name)
    manifest = json.loads((bundle / "manifest.json").read_text())
    q = manifest["target"]["quantization"]
    assert manifest["dtype"] == f"int{bits}" and q["bits"] == bits and q["lm_head"] and q["accuracy_level"] == 4
    ops = Counter(node.op_type for node in _graph(bundle).graph.node)
    assert ops["MatMul"] == 0 and ops["FusedMatMul"] == 0 and ops["MatMulNBits"] > 0  # the lm_head too
    assert manifest["target"]["parity"]["unquantized_max_abs_logit_diff"] <= manifest["target"]["parity"]["tolerance"]


def test_quantized_bundle_is_smaller(int4_bundle, int8_bundle, llama_bundle):
    sizes = {b: json.loads((b / "manifest.json").read_text())["target"]["weight_bytes"]
             for b in (int4_bundle, int8_bundle, llama_bundle)}
    assert sizes[int4_bundle] < sizes[int8_bundle] < sizes[llama_bundle]


def test_info_shows_the_quantization(int4_bundle):
    from specx.cli import app
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["info", str(int4_bundle)]).stdout
    assert "quantized int4 MatMulNBits block 32 accuracy_level 4, lm_head too" in out
    assert "before quantization" in out


def test_derived_draft_inherits_the_quantization(int4_bundle):
    manifest = json.loads((int4_bundle / "manifest.json").read_text())
    assert manifest["draft"]["derived_from"] == "self:layers=1" and manifest["draft"]["quantization"]["bits"] == 4


@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
def test_quantized_target_speculation_equals_its_own_plain_decoding(int4_bundle, mode):
    gen = Generator.load(int4_bundle, provider="cpu")
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode="autoregressive").tokens
        fast = gen.generate(prompt, max_new_tokens=24, ignore_eos=True, mode=mode, tree_depth=3).tokens
        assert fast == plain


def test_quantized_bundle_decodes_without_torch(int8_bundle):
    proc = _run(f"""
        import json
        from specx.runtime import Generator
        r = Generator.load({str(int8_bundle)!r}, provider="cpu").generate("one two", max_new_tokens=6, ignore_eos=True)
        print(json.dumps(r.tokens))
    """)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 6

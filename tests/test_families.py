"""Every family specx exports, on tiny random checkpoints with the config variants that change the graph (biases,
q/k norms, decoupled head_dim, sliding windows shorter than the context, softcapping, partial and long rotary, NoPE
layers, sandwich norms, a head size GroupQueryAttention refuses): ONNX == transformers on trees after a past longer
than any window, greedy == transformers' generate, speculative and staged == plain decoding, int4 decodes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specx.exporter.adapters import adapter_for
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.exporter.validate import TOLERANCE, validate_decoder
from specx.graphs.decoder import uses_gqa
from specx.runtime import Generator
from specx.runtime.manifest import Manifest
from tests import tiny_models

PROMPTS = ("def f12(x):", "the quick brown fox")
LONG_PAST = 3 * tiny_models.WINDOW  # past rows well beyond every test window
LONG_TREE = 14


@pytest.fixture(scope="module", params=list(tiny_models.FAMILIES))
def family(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(variant, checkpoint, bundle with a self:layers=1 draft)."""
    variant = request.param
    src = tiny_models.save_family(tmp_path_factory.mktemp("hf") / variant, variant)
    out = export_bundle(ExportRequest(str(src), draft="self:layers=1", output=tmp_path_factory.mktemp("b") / variant,
                                      dtype="fp32", ngram_tokens=0))
    return variant, src, out


def _generate_limit(src: Path) -> int:
    """Positions to compare with transformers' generate: the context, or for longrope its original length
    (transformers re-encodes the whole sequence with the long factors when a generation crosses it; specx, like
    onnxruntime-genai, keeps the cached rows: docs/design.md)."""
    config = AutoModelForCausalLM.from_pretrained(src).config
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        return int(rope["original_max_position_embeddings"])
    return tiny_models.CONTEXT


def test_the_family_exports_with_its_features(family):
    variant, src, bundle = family
    manifest = Manifest.read(bundle)
    model_type = tiny_models.FAMILIES[variant][0]
    assert manifest.target.architecture.model_type == model_type
    parity = manifest.target.parity
    assert parity["max_abs_logit_diff"] <= parity["tolerance"]
    model = AutoModelForCausalLM.from_pretrained(src)
    adapter = adapter_for(model.config)
    family_spec = adapter.family
    config = model.config
    if getattr(config, "sliding_window", None) and variant != "phi3":
        assert tiny_models.WINDOW in family_spec.windows
    if variant == "llama-hd12":
        assert not uses_gqa(adapter.spec)
    if variant.startswith("gemma2"):
        assert family_spec.attn_softcap and family_spec.final_softcap and family_spec.sandwich_norms
    if variant in ("qwen3", "gemma3_text"):
        assert family_spec.qk_norm
    if variant == "phi3":
        assert family_spec.rotary_dim == adapter.spec.head_dim // 2
    if variant == "smollm3":
        assert [k.rope for k in family_spec.layers].count(None) == 1


def test_tree_logits_equal_transformers_after_a_long_past(family, tmp_path: Path):
    """A random tree after a past three windows long: every sliding layer masks what transformers masks."""
    variant, src, bundle = family
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = adapter_for(model.config)
    contract = Manifest.read(bundle).target.contract
    for seed in range(2):
        parity = validate_decoder(adapter, model, contract, bundle / "target.onnx", "fp32", seed=seed,
                                  past=LONG_PAST, nodes=LONG_TREE)
        assert parity.max_abs_logit_diff <= parity.tolerance, (variant, seed)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(family, prompt):
    variant, src, bundle = family
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = AutoTokenizer.from_pretrained(src)(prompt, return_tensors="pt").input_ids
    new = _generate_limit(src) - ids.shape[1]
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, new
    with torch.no_grad():
        ref = model.generate(ids, generation_config=config, eos_token_id=None)[0, ids.shape[1]:].tolist()
    result = Generator.load(bundle, provider="cpu").generate(prompt, max_new_tokens=new, ignore_eos=True,
                                                             mode="autoregressive")
    assert result.tokens == ref, variant
    assert len(set(ref)) > 3  # not degenerate: the comparison means something


@pytest.mark.parametrize("mode,budget,depth", [("speculative", 5, 5), ("speculative", 8, 4), ("staged", 8, 4)])
def test_speculation_equals_plain_decoding(family, mode, budget, depth):
    """To the end of the context: every window and rotary table holds inside trees and near the end."""
    variant, _, bundle = family
    gen = Generator.load(bundle, provider="cpu")
    for prompt in PROMPTS:
        new = gen.max_positions - len(gen.bundle.tokenizer.encode(prompt).ids)
        plain = gen.generate(prompt, max_new_tokens=new, mode="autoregressive", ignore_eos=True)
        spec = gen.generate(prompt, max_new_tokens=new, mode=mode, ignore_eos=True, tree_budget=budget,
                            tree_depth=depth)
        assert spec.tokens == plain.tokens, (variant, prompt, mode)
        assert spec.stats.draft_calls > 0


def test_int4_exports_and_speculates_losslessly(family, tmp_path: Path):
    variant, src, _ = family
    out = export_bundle(ExportRequest(str(src), draft="self:layers=1,int4", output=tmp_path / "int4", dtype="int4",
                                      ngram_tokens=0))
    manifest = Manifest.read(out)
    assert manifest.target.quantization["bits"] == 4
    assert np.isfinite(manifest.target.parity["max_abs_logit_diff"])
    assert manifest.target.parity["unquantized_max_abs_logit_diff"] <= TOLERANCE["fp32"] * 100
    gen = Generator.load(out, provider="cpu")
    plain = gen.generate(PROMPTS[0], max_new_tokens=40, mode="autoregressive", ignore_eos=True)
    assert manifest.target.parity["chains_exact"] is True  # no one-row attention call: chain passes are bitwise steps
    spec = gen.generate(PROMPTS[0], max_new_tokens=40, mode="speculative", ignore_eos=True, tree_budget=4,
                        tree_depth=4)
    assert spec.tokens == plain.tokens and len(plain.tokens) == 40, variant


def test_longrope_tables_switch_per_position(tmp_path: Path):
    """Rows below original_max_position_embeddings hold the short factors, the rest the long ones (as transformers
    computes them for a pass that reaches that far), so every position reads one table whatever the pass."""
    src = tiny_models.save_family(tmp_path / "phi3", "phi3")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    weights = adapter_for(model.config).weights(model)
    original = model.config.rope_parameters["original_max_position_embeddings"]
    rotary, half = model.model.rotary_emb, weights.rope_cos.shape[1]
    probe = torch.zeros(1)
    with torch.no_grad():
        long_cos = rotary(probe, torch.arange(tiny_models.CONTEXT)[None])[0][0, :, :half].numpy()
        short_cos = rotary(probe, torch.arange(original)[None])[0][0, :, :half].numpy()
    np.testing.assert_allclose(weights.rope_cos[:original], short_cos, atol=1e-6)
    np.testing.assert_allclose(weights.rope_cos[original:], long_cos[original:], atol=1e-6)
    assert not np.allclose(long_cos[:original], short_cos, atol=1e-3)  # the factors differ: the test means something


@pytest.mark.parametrize("variant", list(tiny_models.FAMILIES))
def test_train_draft_for_every_family(variant: str, tmp_path: Path):
    """`specx train-draft` end to end (a few seconds of training): the trained draft speculates losslessly."""
    import contextlib

    from specx.drafttrain.pipeline import TrainDraftRequest, train_draft

    src = tiny_models.save_family(tmp_path / variant, variant)
    out = export_bundle(ExportRequest(str(src), draft="none", output=tmp_path / "bundle", dtype="fp32",
                                      ngram_tokens=0))
    train_draft(TrainDraftRequest(out, tokens=2000, draft_vocab=200, epochs=2), lambda _: contextlib.nullcontext())
    manifest = Manifest.read(out)
    assert manifest.draft is not None and manifest.draft.is_feature_draft
    gen = Generator.load(out, provider="cpu")
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=40, mode="autoregressive", ignore_eos=True)
        spec = gen.generate(prompt, max_new_tokens=40, mode="speculative", ignore_eos=True)
        assert spec.tokens == plain.tokens, (variant, prompt)
        assert spec.stats.draft_calls > 0


@pytest.mark.parametrize("variant", ["qwen2-window", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_static_shape_graphs_mask_windows_exactly(variant: str, tmp_path: Path):
    """The static-shape contract (CUDA graphs): a capacity-wide mask and past_length; windows computed from fixed
    shapes still match transformers on trees after a long past."""
    from specx.exporter.onnx_export import export_decoder

    src = tiny_models.save_family(tmp_path / variant, variant)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = adapter_for(model.config)
    contract = export_decoder(adapter, model, tmp_path / "static.onnx", "float32", static_shapes=True)
    assert contract.static_shapes
    for seed in range(2):
        parity = validate_decoder(adapter, model, contract, tmp_path / "static.onnx", "fp32", seed=seed,
                                  past=LONG_PAST, nodes=LONG_TREE)
        assert parity.max_abs_logit_diff <= parity.tolerance, (variant, seed)

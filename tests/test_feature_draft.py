"""Trained feature drafts (`specx train-draft`): training learns, the graphs match the trainer, decoding with the
draft is lossless, the bundle stays torch-free, and a failed run leaves the bundle as it was."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specx.drafttrain.data import distill, generate_texts
from specx.drafttrain.pipeline import TrainDraftRequest, train_draft
from specx.drafttrain.train import TrainConfig, agreement, default_feature_layers, new_draft, train
from specx.errors import ContractError
from specx.exporter.adapters import adapter_for
from specx.exporter.pipeline import ExportRequest, export_bundle, with_records
from specx.exporter.sources import load_source
from specx.graphs.contract import FEATURES, HIDDEN, HIDDEN_STATES
from specx.runtime.bundle import Bundle
from specx.runtime.feature_draft import check_feature_draft
from specx.runtime.generator import (DRAWN_TREE_THRESHOLD, FEATURE_GREEDY_TREE, FEATURE_GREEDY_TREE_FLOOR,
                                     FEATURE_GREEDY_TREE_THRESHOLD, GREEDY_TREE_THRESHOLD, Generator, _decoder)
from specx.runtime.integrity import verify_files
from specx.runtime.manifest import Manifest
from specx.runtime.tree import chain
from tests import tiny_models
from tests.helpers import CACHE_ROWS, assert_first_two_tokens_follow_the_model
from tests.test_torch_free import _run

TRAIN_TOKENS = 4000
DRAFT_VOCAB = 200
TINY_EPOCHS = 40  # a few hundred steps on the tiny model: seconds
PROMPTS = ("def f1", "the quick brown fox", "one two three", "return x *")


def _step(_: str):
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def predictable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_trained_llama(tmp_path_factory.mktemp("hf") / "tiny-llama-trained")


@pytest.fixture(scope="module")
def feature_bundle(tmp_path_factory: pytest.TempPathFactory, predictable_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-feature"
    export_bundle(ExportRequest(str(predictable_dir), draft="none", output=out, dtype="fp32", ngram_tokens=0))
    train_draft(TrainDraftRequest(out, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=TINY_EPOCHS,
                                  draft_bits=None), _step)  # float32: the parity tests compare it with torch
    return out


@pytest.fixture(scope="module")
def two_layer_bundle(tmp_path_factory: pytest.TempPathFactory, predictable_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-feature-2"
    export_bundle(ExportRequest(str(predictable_dir), draft="none", output=out, dtype="fp32", ngram_tokens=0))
    train_draft(TrainDraftRequest(out, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=TINY_EPOCHS // 4,
                                  draft_bits=None, draft_layers=2), _step)
    return out


def test_training_learns_and_beats_an_untrained_draft(predictable_dir: Path):
    loaded = load_source(str(predictable_dir))
    adapter = adapter_for(loaded.model.config)
    layers = default_feature_layers(adapter.spec.num_layers)
    texts = generate_texts(loaded.model, loaded.tokenizer, TRAIN_TOKENS, np.random.default_rng(0))
    train_set, held_out = distill(loaded.model, texts, layers).split(4)
    vocab_map = np.arange(adapter.spec.vocab_size)
    draft = new_draft(loaded.model, adapter, layers, vocab_map, seed=0)
    before = agreement(draft, held_out, vocab_map, adapter.spec.vocab_size, 2)
    log = train(draft, train_set, vocab_map, adapter.spec.vocab_size, TrainConfig(epochs=TINY_EPOCHS))
    after = agreement(draft, held_out, vocab_map, adapter.spec.vocab_size, 2)
    assert log.last_loss < 0.8 * log.first_loss
    assert after[0] > before[0] + 0.1, (before, after)  # measured: 1% -> 28% (one level), 1% -> 19% (two)
    assert after[1] > before[1] + 0.05, (before, after)


def test_the_target_writes_chat_and_plain_texts_that_run_past_the_end_token(models_dir: Path):
    from transformers import AutoTokenizer

    from tests.test_chat import TEMPLATE

    path = tiny_models.save_llama(models_dir / "tiny-llama-chat-texts", layers=1, seed=6)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    model = load_source(str(path)).model
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] += 4.0  # the end token comes early and often
    texts = generate_texts(model, tokenizer, 3000, np.random.default_rng(0))
    assistant = tokenizer("<s>assistant", add_special_tokens=False)["input_ids"]
    chat = [any(t[i:i + len(assistant)].tolist() == assistant for i in range(t.size)) for t in texts]
    plain = [t for t, c in zip(texts, chat) if not c]
    assert sum(chat) >= 2 and len(plain) >= 4  # template turns; openings, free and random samples
    assert sum(eos in t[:-1].tolist() for t in plain) >= len(plain) // 2  # written on past the end token
    assert sum(t.size for t in texts) >= 3000


def test_bfloat16_is_used_only_where_it_measures_faster(monkeypatch):
    from specx.drafttrain import precision

    assert precision.fast_dtype("cpu") in (torch.float32, torch.bfloat16)
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: 1.0 if dtype == torch.bfloat16 else 0.5)
    assert precision.fast_dtype("cpu") == torch.float32  # emulated bfloat16 (no AMX / AVX512-BF16): slower
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: 1.0 if dtype == torch.bfloat16 else 3.0)
    assert precision.fast_dtype("cpu") == torch.bfloat16


def test_sampling_inside_greedy_generation_draws_from_the_tempered_distribution():
    """The writer's sampler (one uniform per row against the CDF) follows softmax(logits / T): chi-square test."""
    from specx.drafttrain.data import InverseCdfSampling

    chi2_critical = 18.47  # 4 degrees of freedom, p = 0.001

    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    rows, temperature = 40_000, 0.8
    scores = InverseCdfSampling(temperature)(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
    assert bool((torch.isfinite(scores).sum(-1) == 1).all())  # exactly one token left for the greedy step
    counts = torch.bincount(scores.argmax(-1), minlength=logits.numel()).numpy()
    expected = torch.softmax(logits / temperature, -1).numpy() * rows
    assert float(((counts - expected) ** 2 / expected).sum()) < chi2_critical
    cold = InverseCdfSampling(0.05)(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1)).argmax(-1)
    assert float((cold == 2).float().mean()) > 0.99  # low temperature: nearly always the argmax


def test_cli_defaults_are_the_pipelines():
    """The CLI states its defaults as literals (it must import without torch); they must match the API's."""
    import inspect

    from specx import cli
    from specx.drafttrain.pipeline import CPU_DEFAULT_TOKENS, DEFAULT_DRAFT_VOCAB, DEFAULT_TOKENS, default_tokens

    options = inspect.signature(cli.train_draft_command).parameters
    assert options["tokens"].default.default is None and TrainDraftRequest.tokens is None  # by device:
    assert default_tokens("cuda") == DEFAULT_TOKENS and default_tokens("cpu") == CPU_DEFAULT_TOKENS
    assert options["epochs"].default.default == TrainConfig.epochs
    assert options["draft_vocab"].default.default == DEFAULT_DRAFT_VOCAB
    assert options["draft_layers"].default.default == TrainDraftRequest.draft_layers
    assert options["hard_label"].default.default == TrainDraftRequest.hard_label


def test_bundle_records_the_training(feature_bundle: Path):
    manifest = Manifest.read(feature_bundle)
    draft = manifest.draft
    assert draft is not None and draft.is_feature_draft and draft.contract.vocab_size == DRAFT_VOCAB
    assert manifest.target.contract.feature_layers == default_feature_layers(manifest.target.architecture.num_layers)
    training = draft.training
    assert training["kind"] == "feature" and training["seed"] == 0 and training["draft_vocab"] == DRAFT_VOCAB
    assert training["train_tokens"] > 0 and len(training["held_out_agreement"]) == TrainConfig.unroll
    assert training["held_out_agreement"][0] > training["untrained_agreement"][0]
    assert 0.0 < training["train_agreement"] <= 1.0 and training["draft_layers"] == 1
    assert training["hard_label"] == 0.0 and "argmax" not in training["method"]
    assert training["held_out_tau"] > 1.0
    assert draft.parity["max_abs_diff"] <= draft.parity["tolerance"]
    assert np.load(feature_bundle / draft.vocab_map).shape == (DRAFT_VOCAB,)


@pytest.mark.parametrize("bundle_fixture", ["feature_bundle", "two_layer_bundle"])
def test_training_time_unroll_matches_the_runtime_tree_levels(bundle_fixture: str, predictable_dir: Path,
                                                              request: pytest.FixtureRequest):
    """Step k of the trainer's unroll at row t == the ORT draft run as the runtime runs a tree level k deep."""
    from specx.drafttrain.model import unrolled_logits

    feature_bundle = request.getfixturevalue(bundle_fixture)
    bundle = Bundle.load(feature_bundle)
    assert bundle.manifest.draft.contract.num_layers == (2 if bundle_fixture == "two_layer_bundle" else 1)
    session = _decoder(bundle, bundle.manifest.draft, "cpu")
    session.reserve(CACHE_ROWS)
    contract = session.contract
    rng = np.random.default_rng(1)
    rows = 7
    tokens = rng.integers(0, 300, (1, rows))
    features = rng.standard_normal((1, rows, contract.feature_width)).astype(np.float32)
    features[0, 0] = 0.0  # row 0 has no earlier position
    no_hidden = np.zeros((1, 0, contract.hidden_size), np.float32)
    no_features = np.zeros((1, 0, contract.feature_width), np.float32)
    prefix = rows - 2  # rows [0, prefix) with target features; then two tree levels on the draft's own states
    run = chain(prefix)
    session.forward(tokens[:, :prefix], run.positions(0), run.attention_mask(0),
                    {FEATURES: features[:, :prefix], HIDDEN: no_hidden})
    state = session.outputs[HIDDEN_STATES][:, -1:].copy()
    session.commit()
    level_logits = []
    for depth in range(2):
        one = chain(1)
        logits = session.forward(tokens[:, prefix + depth: prefix + depth + 1], one.positions(session.past_len),
                                 one.attention_mask(session.past_len), {FEATURES: no_features, HIDDEN: state})
        state = session.outputs[HIDDEN_STATES].copy()
        session.commit()
        level_logits.append(logits[0, 0])
    draft = _load_trained_torch_draft(feature_bundle, predictable_dir)
    with torch.no_grad():
        fused = draft.fuse_features(torch.from_numpy(features))
        steps = unrolled_logits(draft, torch.from_numpy(tokens), fused, 3)
    for depth in range(2):  # level depth + 1 at row prefix + depth
        expected = steps[depth + 1][0, prefix + depth].numpy()
        np.testing.assert_allclose(level_logits[depth], expected, atol=2e-4 * max(1.0, np.abs(expected).max()))


def _load_trained_torch_draft(bundle_dir: Path, predictable_dir: Path):
    """The torch draft with the weights of the bundle's draft graph (read back from the ONNX initializers)."""
    import onnx
    from onnx import numpy_helper

    manifest = Manifest.read(bundle_dir)
    graph = onnx.load(str(bundle_dir / manifest.draft.graph))
    w = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    loaded = load_source(str(predictable_dir))
    adapter = adapter_for(loaded.model.config)
    vocab_map = np.load(bundle_dir / manifest.draft.vocab_map)
    draft = new_draft(loaded.model, adapter, manifest.target.contract.feature_layers, vocab_map, seed=0,
                      num_layers=manifest.draft.contract.num_layers)
    spec = adapter.spec
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    pairs = {
        draft.fuse: w["draft.fuse.weight"].T, draft.fc: w["draft.fc.weight"].T, draft.head: w["lm_head.weight"].T,
        draft.norm: w["model.norm.weight"],
        draft.embed_norm: w["draft.embed_norm.weight"], draft.state_norm: w["draft.state_norm.weight"],
        draft.feature_norm: np.ones_like(draft.feature_norm.weight.detach().numpy()),  # gains folded into fuse
    }
    for i, layer in enumerate(draft.layers):
        qkv = w[f"model.layers.{i}.attn.qkv_proj.weight"].T
        pairs |= {
            layer.q_proj: qkv[:q], layer.k_proj: qkv[q:q + kv], layer.v_proj: qkv[q + kv:],
            layer.o_proj: w[f"model.layers.{i}.attn.o_proj.weight"].T,
            layer.gate_proj: w[f"model.layers.{i}.mlp.gate_proj.weight"].T,
            layer.up_proj: w[f"model.layers.{i}.mlp.up_proj.weight"].T,
            layer.down_proj: w[f"model.layers.{i}.mlp.down_proj.weight"].T,
            layer.attn_norm: w[f"model.layers.{i}.input_layernorm.weight"],
            layer.mlp_norm: w[f"model.layers.{i}.post_attention_layernorm.weight"],
        }
    with torch.no_grad():
        for module, array in pairs.items():
            module.weight.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))
    return draft.eval()


@pytest.mark.parametrize("mode", ["speculative", "staged"])
@pytest.mark.parametrize("budget,depth,floor", [(5, 5, 0.0), (8, 4, 0.0), (8, 4, 0.3), (12, 3, None)])
def test_greedy_with_a_trained_draft_equals_plain_decoding(feature_bundle: Path, mode: str, budget: int, depth: int,
                                                            floor: float | None):
    gen = Generator.load(feature_bundle, provider="cpu")
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=40, mode="autoregressive", ignore_eos=True)
        spec = gen.generate(prompt, max_new_tokens=40, mode=mode, ignore_eos=True, tree_budget=budget,
                            tree_depth=depth, tree_floor=floor)
        assert spec.tokens == plain.tokens, (prompt, mode)
        assert spec.stats.draft_calls > 0
        assert spec.stats.tree_floor == (FEATURE_GREEDY_TREE_FLOOR if floor is None else floor)


@pytest.mark.parametrize("mode", ["speculative", "staged"])
def test_greedy_with_a_two_layer_draft_equals_plain_decoding(two_layer_bundle: Path, mode: str):
    gen = Generator.load(two_layer_bundle, provider="cpu")
    assert gen.draft.contract.num_layers == 2
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=40, mode="autoregressive", ignore_eos=True)
        fast = gen.generate(prompt, max_new_tokens=40, mode=mode, ignore_eos=True, tree_budget=8, tree_depth=4)
        assert fast.tokens == plain.tokens, (prompt, mode)


def test_the_default_tree_of_a_trained_draft_reaches_the_end_of_the_context(feature_bundle: Path):
    """The default 8x4 tree (greedy) shrinks to the positions left near the end of the context (it crashed in
    GroupQueryAttention there)."""
    gen = Generator.load(feature_bundle, provider="cpu")
    ids = gen.bundle.tokenizer.encode(PROMPTS[0]).ids
    new = gen.max_positions - len(ids)
    plain = gen.generate(ids, max_new_tokens=new, mode="autoregressive", ignore_eos=True)
    spec = gen.generate(ids, max_new_tokens=new, mode="speculative", ignore_eos=True)
    assert (spec.stats.tree_budget, spec.stats.tree_depth) == FEATURE_GREEDY_TREE
    assert spec.tokens == plain.tokens and len(plain.tokens) == new


def test_a_trained_draft_is_accepted_more_than_once_per_step(feature_bundle: Path):
    gen = Generator.load(feature_bundle, provider="cpu")
    taus = [gen.generate(p, max_new_tokens=40, mode="speculative", ignore_eos=True).stats.tokens_per_target_call
            for p in PROMPTS]
    assert np.mean(taus) > 1.1, taus


def test_sampling_with_a_trained_draft_follows_the_model(feature_bundle: Path):
    gen = Generator.load(feature_bundle, provider="cpu")
    assert_first_two_tokens_follow_the_model(gen, "speculative", seed_base=70_000, temperature=1.0)


def test_chat_reuse_with_a_trained_draft_is_exact(feature_bundle: Path):
    """A second turn reuses cached rows (no features for them): still plain decoding's output."""
    gen = Generator.load(feature_bundle, provider="cpu")
    gen.reserve(gen.max_positions)
    first = gen.generate("def f1", max_new_tokens=12, mode="speculative", reuse_cache=True, ignore_eos=True)
    ids = gen.bundle.tokenizer.encode("def f1").ids + first.tokens + gen.bundle.tokenizer.encode(" one two").ids
    second = gen.generate(ids, max_new_tokens=20, mode="speculative", reuse_cache=True, ignore_eos=True)
    plain = Generator.load(feature_bundle, provider="cpu").generate(ids, max_new_tokens=20, mode="autoregressive",
                                                                    ignore_eos=True)
    assert second.stats.reused_prompt_tokens > 0 and second.tokens == plain.tokens


def test_a_trained_draft_bundle_runs_without_torch(feature_bundle: Path):
    proc = _run(f"""
        import json, sys
        from specx.runtime import Generator
        gen = Generator.load({str(feature_bundle)!r}, provider="cpu")
        r = gen.generate("def f1", max_new_tokens=8, mode="speculative", ignore_eos=True)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"tokens": r.tokens, "loaded": loaded, "calls": r.stats.draft_calls}}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 8 and out["loaded"] == [] and out["calls"] > 0


def test_an_interrupted_training_leaves_the_bundle_unchanged(feature_bundle: Path, tmp_path: Path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(feature_bundle, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("specx.drafttrain.pipeline._held_out_tau", interrupted)  # after every file is written
    with pytest.raises(KeyboardInterrupt):
        train_draft(TrainDraftRequest(copy, tokens=600, draft_vocab=DRAFT_VOCAB, epochs=1), _step)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging directory left behind
    Generator.load(copy, provider="cpu").generate("def f1", max_new_tokens=4, mode="speculative")


def test_an_int8_draft_graph_is_quantized_and_lossless(feature_bundle: Path, tmp_path: Path):
    import onnx

    copy = tmp_path / "bundle"
    shutil.copytree(feature_bundle, copy)
    train_draft(TrainDraftRequest(copy, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=1), _step)  # default
    draft = Bundle.load(copy).manifest.draft
    assert draft.quantization["bits"] == 8 and "unquantized_max_abs_logit_diff" in draft.parity
    from typer.testing import CliRunner

    from specx.cli import app

    assert "before quantization" in CliRunner().invoke(app, ["info", str(copy)]).stdout
    graph = onnx.load(str(copy / draft.graph), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) >= 7  # fuse, fc, q/k/v or qkv, o, mlp, head
    assert draft.weight_bytes < 0.5 * Bundle.load(feature_bundle).manifest.draft.weight_bytes
    gen = Generator.load(copy, provider="cpu")
    for prompt in PROMPTS[:2]:
        plain = gen.generate(prompt, max_new_tokens=24, mode="autoregressive", ignore_eos=True)
        spec = gen.generate(prompt, max_new_tokens=24, mode="speculative", ignore_eos=True)
        assert spec.tokens == plain.tokens and spec.stats.draft_calls > 0


@pytest.mark.parametrize("dtype,bits", [("fp16", None), ("fp16-int4", 8)])
def test_a_draft_for_a_float16_target_is_float16_with_its_static_shapes(predictable_dir: Path, tmp_path: Path,
                                                                       dtype: str, bits: int | None):
    """The CUDA formats: the trained draft takes the target's dtype (float16 weights, activations and cache) and
    static shapes (capacity-wide mask, past_length: what a CUDA graph replays), quantized with float compute; held
    to the fp16 bound against the trainer, lossless in every tree mode, on fixed buffers too."""
    import onnx
    from onnx import TensorProto

    out = tmp_path / dtype
    export_bundle(ExportRequest(str(predictable_dir), draft="none", output=out, dtype=dtype, ngram_tokens=0))
    train_draft(TrainDraftRequest(out, tokens=TRAIN_TOKENS, draft_vocab=DRAFT_VOCAB, epochs=TINY_EPOCHS // 4,
                                  draft_bits=bits), _step)
    draft = Bundle.load(out).manifest.draft
    assert draft.contract.kv_dtype == "float16" and draft.contract.static_shapes
    graph = onnx.load(str(out / draft.graph), load_external_data=False)
    floats = {i.data_type for i in graph.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats == {TensorProto.FLOAT16}
    if bits:
        assert draft.quantization["activations"] == "float16" and draft.quantization["accuracy_level"] == 0
        assert draft.parity["unquantized_max_abs_logit_diff"] <= draft.parity["tolerance"]
    else:
        assert draft.parity["max_abs_diff"] <= draft.parity["tolerance"]
        assert draft.parity["max_abs_hidden_diff"] <= draft.parity["hidden_tolerance"]
    fixed = Generator.load(out, provider="cpu", cuda_graphs=True)
    for gen in (Generator.load(out, provider="cpu"), fixed):
        for prompt in PROMPTS[:2]:
            plain = gen.generate(prompt, max_new_tokens=24, mode="autoregressive", ignore_eos=True)
            for mode in ("speculative", "staged"):
                spec = gen.generate(prompt, max_new_tokens=24, mode=mode, ignore_eos=True)
                assert spec.tokens == plain.tokens and spec.stats.draft_calls > 0, (mode, prompt)
    # with CUDA graphs the draft's first calls (features carry the rows) and tree levels (hidden states carry them)
    # ran padded to its buckets on fixed buffers: what a CUDA graph captures
    assert {carriers for _, _, carriers in fixed.draft._fixed} == {(True, False), (False, True)}
    # a pass whose rows are split between features and hidden states is run as it is (unpadded, not fixed)
    draft, run = fixed.draft, chain(3)
    draft.reset()
    before = set(draft._fixed)
    extra = {FEATURES: np.zeros((1, 1, draft.contract.feature_width), np.float32),
             HIDDEN: np.zeros((1, 2, draft.contract.hidden_size), np.float32)}
    logits = draft.forward(np.array([[1, 2, 3]]), run.positions(0), run.attention_mask(0), extra)
    assert logits.shape[:2] == (1, 3) and set(draft._fixed) == before


def test_train_draft_records_the_files_it_writes(feature_bundle: Path):
    manifest = Bundle.load(feature_bundle).manifest
    assert set(manifest.files) == {p.name for p in feature_bundle.iterdir()} - {"manifest.json"}
    assert {manifest.draft.graph, manifest.draft.vocab_map} <= set(manifest.files)
    assert verify_files(feature_bundle, manifest).files == len(manifest.files)


def test_a_draft_that_does_not_fit_its_target_is_a_clear_error(feature_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(feature_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    np.save(copy / manifest["draft"]["vocab_map"], np.arange(DRAFT_VOCAB - 1))
    with_records(Manifest.read(copy), copy).write(copy)  # recorded as written: the map itself is what does not fit
    with pytest.raises(ContractError, match="vocabulary map"):
        Generator.load(copy, provider="cpu")
    # a target graph whose features are not what the draft was trained on (e.g. the target re-exported)
    bundle = Bundle.load(feature_bundle)
    target = SimpleNamespace(contract=replace(bundle.manifest.target.contract, feature_width=7))
    draft = SimpleNamespace(contract=bundle.manifest.draft.contract)
    with pytest.raises(ContractError, match="features"):
        check_feature_draft(target, draft, np.load(feature_bundle / manifest["draft"]["vocab_map"]))


def test_train_draft_command(predictable_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from specx.cli import app

    out = tmp_path / "bundle"
    export_bundle(ExportRequest(str(predictable_dir), draft="none", output=out, dtype="fp32", ngram_tokens=0))
    result = CliRunner().invoke(app, ["train-draft", str(out), "--tokens", "800", "--epochs", "1",
                                      "--draft-vocab", "100"])
    assert result.exit_code == 0, result.output
    assert "held-out agreement" in result.stdout and "tau" in result.stdout
    info = CliRunner().invoke(app, ["info", str(out)])
    assert "feature draft" in info.stdout and "vocabulary 100" in info.stdout
    bad = CliRunner().invoke(app, ["train-draft", str(out), "--draft-vocab", "1"])
    assert bad.exit_code == 1 and "draft-vocab" in bad.output
    bad = CliRunner().invoke(app, ["train-draft", str(out), "--draft-dtype", "int9"])
    assert bad.exit_code == 1 and "--draft-dtype" in bad.output
    bad = CliRunner().invoke(app, ["train-draft", str(out), "--hard-label", "1.5"])
    assert bad.exit_code == 1 and "--hard-label" in bad.output


def test_auto_speculates_with_a_trained_draft_drawing_when_sampling(feature_bundle: Path):
    gen = Generator.load(feature_bundle, provider="cpu")
    sampled = gen.generate("def f1", max_new_tokens=4, temperature=1.0, seed=0).stats
    assert (sampled.mode, sampled.draft_choice) == ("speculative", "sample")
    assert sampled.tree_threshold == DRAWN_TREE_THRESHOLD
    greedy = gen.generate("def f1", max_new_tokens=4).stats
    assert greedy.mode == "speculative"  # staged never won with a trained draft (measured)
    # a trained draft stops deepening sooner when greedy than derived and separate drafts do (measured), and grows
    # a tree of which it verifies the likely nodes
    assert greedy.tree_threshold == FEATURE_GREEDY_TREE_THRESHOLD != GREEDY_TREE_THRESHOLD
    assert (greedy.tree_budget, greedy.tree_depth) == FEATURE_GREEDY_TREE and greedy.tree_floor == \
        FEATURE_GREEDY_TREE_FLOOR > 0
    assert sampled.tree_floor == 0.0 and (sampled.tree_budget, sampled.tree_depth) == (5, 5)
    ngram = gen.generate("def f1", max_new_tokens=4, mode="ngram").stats
    assert ngram.tree_floor == 0.0 and ngram.tree_threshold == 0.0  # no draft values: neither is applied


def test_a_tuned_tree_keeps_the_floor_it_was_measured_with(feature_bundle: Path, monkeypatch):
    gen = Generator.load(feature_bundle, provider="cpu")
    tuned = {"mode": "speculative", "tree_budget": 6, "tree_depth": 3, "tree_threshold": 0.1}
    for record, floor in ((tuned, 0.0), ({**tuned, "tree_floor": 0.2}, 0.2)):  # no floor recorded: measured without
        monkeypatch.setattr(gen, "tuned", lambda sampling, record=record: {} if sampling else dict(record))
        stats = gen.generate("def f1", max_new_tokens=6).stats
        assert (stats.tree_budget, stats.tree_depth, stats.tree_floor) == (6, 3, floor)
    assert gen.generate("def f1", max_new_tokens=6, tree_floor=0.4).stats.tree_floor == 0.4  # a flag wins

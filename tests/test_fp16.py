"""fp16 bundles (for CUDA): exported, validated against PyTorch fp16, runnable through the same runtime path."""

from __future__ import annotations

import dataclasses
import json

import pytest

from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime import Generator


def test_fp16_export_runs_and_agrees_with_fp32(tmp_path, llama_dir, llama_bundle):
    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "fp16", dtype="fp16",
                                      ngram_tokens=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["target"]["contract"]["kv_dtype"] == "float16"
    parity = manifest["target"]["parity"]
    assert parity["max_abs_logit_diff"] <= parity["tolerance"]
    fp32 = json.loads((llama_bundle / "manifest.json").read_text())
    # weights halve; a few int64 constants (shapes, indices) do not
    assert abs(2 * manifest["target"]["weight_bytes"] - fp32["target"]["weight_bytes"]) < 0.01 * fp32["target"]["weight_bytes"]
    half = Generator.load(out, provider="cpu").generate("one two", max_new_tokens=8, ignore_eos=True).tokens
    full = Generator.load(llama_bundle, provider="cpu").generate("one two", max_new_tokens=8, ignore_eos=True).tokens
    assert half[:4] == full[:4]  # fp16 rounding may flip a near-tie later on; the start must agree


def test_fp16_int4_is_the_cuda_format_and_decodes_losslessly(tmp_path, llama_dir):
    """fp16 activations into MatMulNBits (the CUDA kernels' format), 4-bit weights; a derived self:int4 draft of it
    keeps fp16 activations; speculation equals plain decoding of the same graph (CPU here)."""
    out = export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1,int4", output=tmp_path / "fp16-int4",
                                      dtype="fp16-int4", ngram_tokens=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16-int4"
    for role in ("target", "draft"):
        entry = manifest[role]
        assert entry["contract"]["kv_dtype"] == "float16"
        assert entry["quantization"]["bits"] == 4 and entry["quantization"]["activations"] == "float16"
        assert entry["parity"]["unquantized_max_abs_logit_diff"] <= entry["parity"]["tolerance"]
    # the CUDA format quantizes the target with float compute: its trees measure exact on the exporting CPU
    assert manifest["target"]["quantization"]["accuracy_level"] == 0
    assert manifest["target"]["parity"]["row_consistent"] is True
    gen = Generator.load(out, provider="cpu")
    plain = gen.generate("one two", max_new_tokens=24, mode="autoregressive", ignore_eos=True)
    spec = gen.generate("one two", max_new_tokens=24, mode="speculative", ignore_eos=True, tree_budget=6,
                        tree_depth=3)
    assert spec.tokens == plain.tokens and len(plain.tokens) == 24


def test_cuda_formats_have_static_shapes_and_match_the_dynamic_graph(tmp_path, llama_dir, llama_bundle):
    """fp16 graphs take a capacity-wide mask and past_length (the fixed shapes a CUDA graph replays); the same
    tokens as the dynamic fp32 graph's start, and speculative == plain on the static graph itself."""
    from specx.graphs.contract import PAST_LENGTH

    out = export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1", output=tmp_path / "fp16",
                                      dtype="fp16", ngram_tokens=0))
    manifest = json.loads((out / "manifest.json").read_text())
    for role in ("target", "draft"):
        inputs = {s["name"]: s["shape"] for s in manifest[role]["contract"]["inputs"]}
        assert inputs[PAST_LENGTH] == ["batch"] and inputs["tree_mask"][-1] == "capacity"
    fp32 = json.loads((llama_bundle / "manifest.json").read_text())
    assert not any(s["name"] == PAST_LENGTH for s in fp32["target"]["contract"]["inputs"])
    gen = Generator.load(out, provider="cpu")
    plain = gen.generate("one two", max_new_tokens=30, mode="autoregressive", ignore_eos=True).tokens
    for mode in ("speculative", "staged"):
        assert gen.generate("one two", max_new_tokens=30, mode=mode, ignore_eos=True, tree_budget=6,
                            tree_depth=3).tokens == plain
    full = Generator.load(llama_bundle, provider="cpu").generate("one two", max_new_tokens=8, ignore_eos=True).tokens
    assert plain[:4] == full[:4]
    # to the end of a context that is no multiple of the cache block (160): the capacity stops at the context,
    # where the rotary tables end (a capacity rounded up to 192 failed in GroupQueryAttention)
    context = manifest["target"]["architecture"]["max_positions"]
    prompt = gen.bundle.tokenizer.encode("one two").ids
    end = gen.generate(prompt, max_new_tokens=context - len(prompt), mode="autoregressive", ignore_eos=True)
    assert len(end.tokens) == context - len(prompt) and gen.target.capacity == context


def test_quantized_targets_record_whether_their_trees_are_exact(tmp_path, llama_dir):
    """Export measures tree-pass vs one-token-step logits and records it; --quant-accuracy 0 (float compute) is
    recorded in the scheme; bundles from before the record: level-4 quantized targets are not taken as exact."""
    from specx.errors import InvalidArgumentError
    from specx.runtime.generator import exact_trees
    from specx.runtime.manifest import Manifest

    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "int4-exact", dtype="int4",
                                      ngram_tokens=0, quant_accuracy=0))
    entry = Manifest.read(out).target
    assert entry.quantization["accuracy_level"] == 0
    assert entry.parity["row_consistent"] is True and entry.parity["tree_vs_steps"] < 1e-3
    assert exact_trees(entry)
    legacy = dataclasses.replace(entry, parity={k: v for k, v in entry.parity.items() if k != "row_consistent"})
    assert exact_trees(legacy)  # accuracy level 0: float compute
    level4 = dataclasses.replace(legacy, quantization={**entry.quantization, "accuracy_level": 4})
    assert not exact_trees(level4)
    with pytest.raises(InvalidArgumentError, match="quant-accuracy"):
        export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "bad", dtype="int4",
                                    ngram_tokens=0, quant_accuracy=7))


def test_quantized_targets_take_a_block_size(tmp_path, llama_dir):
    from specx.errors import InvalidArgumentError
    from specx.runtime.manifest import Manifest

    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "int4-b64", dtype="int4",
                                      ngram_tokens=0, quant_block=64))
    assert Manifest.read(out).target.quantization["block_size"] == 64
    assert Generator.load(out, provider="cpu").generate("one two", max_new_tokens=8, ignore_eos=True).tokens
    with pytest.raises(InvalidArgumentError, match="quant-block"):
        export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "bad", dtype="int4",
                                    ngram_tokens=0, quant_block=48))


def test_bf16_exports_for_cuda_and_refuses_the_cpu(tmp_path, llama_dir):
    """--dtype bf16 (bfloat16 weights, activations and cache; CUDA only): exported without a GPU its parity is left
    to the GPU check, the graphs are typed consistently (ONNX Runtime resolves them and stops only at the CPU's
    missing bfloat16 kernels), and the runtime refuses the CPU with a message rather than ONNX Runtime's error."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from specx.errors import ProviderError

    out = export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1", output=tmp_path / "bf16", dtype="bf16",
                                      ngram_tokens=0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bf16"
    for role in ("target", "draft"):
        entry = manifest[role]
        assert entry["contract"]["kv_dtype"] == "bfloat16" and entry["parity"]["measured"] is False
        assert any(s["name"] == "past_length" for s in entry["contract"]["inputs"])  # static shapes (CUDA graphs)
        graph = onnx.load(str(out / entry["graph"]))
        floats = {i.data_type for i in graph.graph.initializer if i.data_type in (TensorProto.FLOAT,
                                                                                   TensorProto.FLOAT16,
                                                                                   TensorProto.BFLOAT16)}
        assert floats == {TensorProto.BFLOAT16}
        logits = next(o for o in graph.graph.output if o.name == "logits")
        assert logits.type.tensor_type.elem_type == TensorProto.FLOAT  # ArgMax and numpy read float32
        with pytest.raises(Exception, match="Could not find an implementation"):  # typed right, no CPU kernel
            ort.InferenceSession(str(out / entry["graph"]), providers=["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="runs on CUDA only"):
        Generator.load(out, provider="cpu")


def test_bf16_has_no_quantized_draft(tmp_path, llama_dir):
    from specx.errors import ExportError

    with pytest.raises(ExportError, match="no weight-quantized format"):
        export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1,int4", output=tmp_path / "b", dtype="bf16",
                                    ngram_tokens=0))


def test_a_bf16_cache_is_allocated_without_numpy_bfloat16():
    """numpy has no bfloat16: the cache is allocated by its ONNX type and zeroed through its 16-bit pattern."""
    from specx.graphs.contract import GraphContract
    from specx.runtime.session import DecoderSession, Placement

    contract = GraphContract.decoder(2, 2, 16, 100, "bfloat16", static_shapes=True)
    session = DecoderSession(None, None, contract, Placement("cpu", "cpu"))  # no graph: the buffers alone
    value = session._zeros((1, 2, 64, 16))
    assert value.data_type() == "tensor(bfloat16)" and value.shape() == [1, 2, 64, 16]


def test_train_draft_refuses_a_bf16_bundle_without_a_gpu(tmp_path, llama_dir):
    from specx.drafttrain.pipeline import TrainDraftRequest, train_draft
    from specx.errors import InvalidArgumentError

    out = export_bundle(ExportRequest(str(llama_dir), draft="none", output=tmp_path / "bf16", dtype="bf16",
                                      ngram_tokens=0))
    with pytest.raises(InvalidArgumentError, match="bf16, whose graphs run on CUDA only"):
        train_draft(TrainDraftRequest(out, tokens=600, draft_vocab=50, epochs=1), lambda _: None)

"""scripts/gpu-check.sh + scripts/gpu_check.py (the one-command GPU check) in their CPU smoke mode, and the
exporter on a machine without optimum (GPU machines have torch, transformers and onnx, but no registry)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, GPT2Config

from specx.exporter import adapters
from tests import tiny_models

ROOT = Path(__file__).resolve().parents[1]
MODES = ("autoregressive", "speculative", "staged", "ngram")
SMOKE_TIMEOUT_S = 240
NO_OPTIMUM = "raise ImportError('optimum is blocked in this test: GPU machines have none')\n"


def load_script():  # noqa: ANN201 (the script's module)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """One smoke run through the wrapper, with optimum unimportable (as on the GPU machines)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    blocked = tmp / "blocked" / "optimum"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(NO_OPTIMUM)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp / "blocked")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--provider", "cpu", "--smoke",
                           "--out", str(tmp / "out"), "--work", str(tmp / "work")],
                          capture_output=True, text=True, env=env, timeout=SMOKE_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, json.loads((tmp / "out" / "gpu-check.json").read_text())


def test_smoke_prints_every_table_and_no_failure(smoke):
    done, report = smoke
    for heading in ("(0) node placement", "(1) parity", "(2) greedy equality", "(3) speed", "0 failure(s)"):
        assert heading in done.stdout
    assert report["failures"] == []
    assert report["preflight"]["optional"]["optimum"].startswith("absent")  # the exporter ran without it
    assert report["meta"]["provider"] == "cpu" and report["meta"]["smoke"]


def test_smoke_checks_every_bundle(smoke):
    _, report = smoke
    bundles = {(model, dtype): result for model, entry in report["models"].items()
               for dtype, result in entry["bundles"].items()}
    assert set(bundles) == {("tiny-llama", "fp32"), ("tiny-llama", "fp16"), ("tiny-llama", "fp16-int4"),
                            ("tiny-llama", "fp16+trained-draft"), ("tiny-gpt2", "fp16")}
    for (model, dtype), result in bundles.items():
        assert "not_run" not in result, (model, dtype)
        assert set(result["placement"]) == {"target", "draft"}  # both graphs' nodes, each a child's verbose log
        for placed in result["placement"].values():
            assert placed["nodes"]["CPUExecutionProvider"] > 0 and placed["memcpy_nodes"] == 0
        assert result["parity"]["max_abs_logit_diff"] == 0.0  # CPU against CPU
        assert result["parity"]["device_next_tokens_equal_argmax"]
        verdicts = {row["check"]: row["verdict"] for row in result["equality"]}
        static = dtype != "fp32"
        graph_rows = {check: v for check, v in verdicts.items() if "fixed-buffer" in check}
        assert all(v == "equal" for check, v in verdicts.items() if check not in graph_rows), verdicts
        if static:  # Generator.load(cuda_graphs=True): the fixed-buffer passes, uncaptured on the CPU
            assert len(graph_rows) == len(MODES) and set(graph_rows.values()) == {"equal"}
            graphs = result["cuda_graphs"]
            assert set(graphs["speed"]) == set(MODES) and set(graphs["steps"]["passes"]) == {"1", "16", "64"}
        else:
            assert list(graph_rows.values()) == ["NOT RUN"]
            assert "dynamic-shape" in result["cuda_graphs"]["not_run"]
        assert set(result["speed"]) == set(MODES)
        assert all(s["tokens_per_second"] > 0 for s in result["speed"].values())
        assert set(result["speed_padded"]) == set(MODES[1:])
        steps = result["steps"]
        assert set(steps["passes"]) == {"1", "16", "64"} and steps["draft_call_ms"] > 0
    trained = bundles[("tiny-llama", "fp16+trained-draft")]
    assert trained["export"]["train_draft_seconds"] > 0 and trained["manifest_parity"]["draft"]["provider"] == "cpu"
    assert trained["cuda_graphs"]["steps"]["draft_call_ms"] > 0  # the feature draft's call on fixed buffers


def test_placement_log_parsing():
    gpu_check = load_script()
    log = "\n".join([
        "[I:onnxruntime:, transformer_memcpy.cc:393 AddCopyNode] Add MemcpyFromHost after x for CUDAExecutionProvider",
        "[V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements",
        "[V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CUDAExecutionProvider]. Number of nodes: 40",
        "[V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   MatMul (/model/layers.0/qkv)",
        "[V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
        "[CPUExecutionProvider]. Number of nodes: 3",
        "[V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Shape (/model/shape)",
        "[V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Shape (/model/shape_1)",
        "[V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Gather (/model/gather)",
    ])
    assert gpu_check.parse_placement(log) == {"nodes": {"CUDAExecutionProvider": 40, "CPUExecutionProvider": 3},
                                              "cpu_op_types": {"Shape": 2, "Gather": 1}, "memcpy_nodes": 1}


def test_missing_modules_are_named_before_anything_runs(monkeypatch, capsys, tmp_path):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "EXPORT_MODULES", (*gpu_check.EXPORT_MODULES, "no_such_module_for_specx"))
    assert gpu_check.main(["--provider", "cpu", "--smoke", "--out", str(tmp_path)]) == gpu_check.EXIT_MISSING
    assert "MISSING: python module 'no_such_module_for_specx' is missing" in capsys.readouterr().err
    assert not (tmp_path / "gpu-check.json").exists()


def test_cuda_without_a_cuda_build_is_a_clear_exit(monkeypatch, capsys, tmp_path):
    import onnxruntime as ort

    gpu_check = load_script()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu_check.main(["--provider", "cuda", "--smoke", "--out", str(tmp_path)]) == gpu_check.EXIT_MISSING
    assert "has no CUDAExecutionProvider" in capsys.readouterr().err


def _family_config(variant: str):  # noqa: ANN202
    model_type, overrides = tiny_models.FAMILIES[variant]
    settings = dict(vocab_size=tiny_models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tiny_models.CONTEXT)
    settings.update(overrides)
    if "layer_types" in settings:
        settings["layer_types"] = [settings["layer_types"][i % 2] for i in range(settings["num_hidden_layers"])]
    return AutoConfig.for_model(model_type, **settings)


@pytest.mark.parametrize("variant", ["gpt2", "llama", *tiny_models.FAMILIES])
def test_the_exporter_reads_configs_without_optimum(monkeypatch, variant):
    if variant == "gpt2":
        config = GPT2Config(vocab_size=tiny_models.VOCAB, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    elif variant == "llama":
        config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    else:
        config = _family_config(variant)
    with_optimum = adapters.adapter_for(config).spec
    monkeypatch.setattr(adapters, "NormalizedConfigManager", None)
    monkeypatch.setattr(adapters, "NormalizedTextConfigWithGQA", None)
    assert adapters.adapter_for(config).spec == with_optimum


def test_what_the_time_budget_cuts_is_reported_not_dropped(capsys, tmp_path):
    gpu_check = load_script()
    assert gpu_check.main(["--provider", "cpu", "--smoke", "--budget-s", "0", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "5 bundle(s) not run" in out and out.count("NOT RUN tiny-") == 5
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert all("time budget" in r["not_run"] for e in report["models"].values() for r in e["bundles"].values())


def test_jobs_run_every_models_first_dtype_first():
    gpu_check = load_script()
    order = [(shape.name, dtype) for shape, dtype in gpu_check.jobs((gpu_check.SMOLLM2, gpu_check.GPT2_LARGE), ())]
    assert order == [("smollm2-135m-shape", "fp16"), ("gpt2-large-shape", "fp16"),
                     ("smollm2-135m-shape", "fp16+trained-draft"), ("smollm2-135m-shape", "fp16-int4"),
                     ("smollm2-135m-shape", "bf16"), ("smollm2-135m-shape", "fp32")]


def test_bf16_is_checked_on_the_device_alone(tmp_path, llama_dir):
    """bf16 bundles have no CPU kernels: the CPU run reports them not run, and on a GPU their checks compare the
    device with PyTorch (export) and with its own plain decoding. That device-only path, run here on an fp16
    bundle standing in for one (the CPU as the device)."""
    from specx.exporter.pipeline import ExportRequest, export_bundle
    from specx.runtime import Generator

    gpu_check = load_script()
    info, fatal = gpu_check.preflight("cpu", ["fp16", "bf16"])
    assert not fatal and info["skipped_dtypes"] == {"bf16": "runs on CUDA only"}
    bundle = export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1", output=tmp_path / "fp16",
                                         dtype="fp16", ngram_tokens=0))
    device = Generator.load(bundle, provider="cpu")
    ctx = gpu_check.Context(gpu_check.TINY_LLAMA, "bf16", gpu_check.SMOKE_SETTINGS, "cpu",
                            gpu_check.make_prompt(device.target.contract.vocab_size, gpu_check.SMOKE_SETTINGS),
                            bundle, device, None)
    result = gpu_check.parity(ctx, np.random.default_rng(0))
    assert result["reference"].startswith("PyTorch at export") and result["device_next_tokens_equal_argmax"]
    rows = gpu_check.equality(ctx)
    assert rows and all("cpu" not in row["check"] for row in rows) and not ctx.failures

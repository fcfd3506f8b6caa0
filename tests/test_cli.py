"""The CLI, and every bad input: one line naming the problem, exit code != 0, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from typer.testing import CliRunner

from specx.cli import app
from tests import tiny_models

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _user_error(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], result.output
    return lines[0]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


# -- run -----------------------------------------------------------------------------------------------------------
def test_run_json(gpt2_bundle):
    out = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "12",
                          "--ignore-eos", "--json"]).stdout)
    assert set(out) == {"text", "tokens", "stats"}
    stats = out["stats"]
    for key in ("mode", "provider", "new_tokens", "target_calls", "draft_calls", "seconds", "tokens_per_second"):
        assert key in stats
    assert stats["new_tokens"] == len(out["tokens"]) == 12 and stats["mode"] == "staged"  # draft + n-gram table
    for key in ("tokens_per_target_call", "accepted_histogram", "draft_seconds", "target_seconds",
                "overhead_fraction", "weight_bytes_ratio"):
        assert key in stats


def test_run_streams_text_and_summary(gpt2_bundle):
    result = _ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "10",
                  "--ignore-eos", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "4"])
    assert "tokens/s" in result.stderr and "mode speculative" in result.stderr and "provider cpu" in result.stderr
    again = _ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "10",
                 "--ignore-eos", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "4"])
    assert result.stdout == again.stdout


def test_run_draft_choice(gpt2_bundle):
    """--draft-choice top samples exactly plain decoding's tokens for a seed; sample (the default) draws its own."""
    def tokens(*extra):
        out = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "16",
                              "--ignore-eos", "--temperature", "1", "--seed", "5", "--json", *extra]).stdout)
        return out["tokens"], out["stats"]["draft_choice"]

    plain, _ = tokens("--mode", "autoregressive")
    assert tokens("--mode", "speculative", "--draft-choice", "top") == (plain, "top")
    drawn, choice = tokens("--mode", "speculative")
    assert choice == "sample" and drawn != plain
    bad = runner.invoke(app, ["run", "--model", str(gpt2_bundle), "--prompt", "x", "--draft-choice", "best"])
    assert bad.exit_code != 0 and "--draft-choice" in bad.output  # typer names the allowed values


def test_info(gpt2_bundle):
    out = _ok(["info", str(gpt2_bundle)]).stdout
    assert "target" in out and "draft" in out and "gpt2" in out and "logit diff" in out and "ngram.npz" in out
    assert "trees    exact (tree pass vs one-token steps:" in out


def test_export_cli_to_specx_home_and_run_by_name(tmp_path, monkeypatch, models_dir):
    monkeypatch.setenv("SPECX_HOME", str(tmp_path / "home"))
    src = tiny_models.save_llama(models_dir / "tiny-llama-tied", tied=True, layers=1, seed=3)
    _ok(["export", str(src), "--draft", "none", "--dtype", "fp32", "--ngram-tokens", "256"])
    bundle = tmp_path / "home" / "tiny-llama-tied"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["architecture"]["tied_embeddings"] is True and manifest["draft"] is None
    assert manifest["ngram"]["info"]["sampled_tokens"] >= 256 and (bundle / "ngram.npz").is_file()
    assert manifest["target"]["parity"]["max_abs_logit_diff"] < manifest["target"]["parity"]["tolerance"]
    out = json.loads(_ok(["run", "--model", "tiny-llama-tied", "--prompt", "one", "--max-new-tokens", "3",
                          "--json"]).stdout)
    assert out["stats"]["new_tokens"] >= 1 and out["stats"]["mode"] == "ngram"  # no draft, an n-gram table


# -- bad input -----------------------------------------------------------------------------------------------------
def test_missing_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECX_HOME", str(tmp_path))
    line = _user_error(["run", "--prompt", "hi"], "specx export gpt2-large")
    assert "gpt2-large" in line


def test_corrupt_manifest(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    (bundle / "manifest.json").write_text("{not json")
    _user_error(["run", "--model", str(bundle), "--prompt", "hi"], "corrupt")


def test_corrupt_graph(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    (bundle / "target.onnx").write_bytes(b"garbage")
    _user_error(["run", "--model", str(bundle), "--prompt", "hi", "--provider", "cpu"], "re-export")


def test_missing_graph_file(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    (bundle / "target.kv_commit.onnx").unlink()
    _user_error(["run", "--model", str(bundle), "--prompt", "hi"], "incomplete")


def test_newer_bundle_format(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _user_error(["info", str(bundle)], "upgrade specx")


def test_contract_mismatch(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"]["contract"]["num_kv_heads"] += 1
    manifest["target"]["contract"]["inputs"][3]["shape"][1] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _user_error(["run", "--model", str(bundle), "--prompt", "hi", "--provider", "cpu"], "contract")


def test_empty_prompt(gpt2_bundle):
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", ""], "empty")


@pytest.mark.parametrize("flag,value,match", [("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top_p"),
                                              ("--top-k", "-3", "top_k"), ("--max-new-tokens", "0", "max_new_tokens"),
                                              ("--max-new-tokens", "100000", "context")])
def test_invalid_sampling_and_length(gpt2_bundle, flag, value, match):
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", flag, value], match)


def test_run_tree_options(gpt2_bundle):
    out = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "12",
                          "--mode", "speculative", "--tree-budget", "3", "--tree-depth", "3", "--json"]).stdout)
    assert out["stats"]["tree_budget"] == 3 and out["stats"]["tree_depth"] == 3
    ar = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "12",
                         "--mode", "autoregressive", "--json"]).stdout)
    assert ar["tokens"] == out["tokens"]
    floored = json.loads(_ok(["run", "--model", str(gpt2_bundle), "--prompt", "one two", "--max-new-tokens", "12",
                              "--mode", "speculative", "--tree-budget", "8", "--tree-depth", "4", "--tree-floor",
                              "0.3", "--json"]).stdout)
    assert floored["stats"]["tree_floor"] == 0.3 and floored["stats"]["nodes_per_verify"] < 8
    assert floored["tokens"] == ar["tokens"]
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", "--tree-floor", "1"], "floor")


def test_bad_tree_shape(gpt2_bundle):
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", "--tree-budget", "2", "--tree-depth", "4"],
                "budget")


def test_mode_needs_a_draft(llama_bundle):
    _user_error(["run", "--model", str(llama_bundle), "--prompt", "hi", "--mode", "staged"], "draft")


def test_unavailable_provider(gpt2_bundle):
    try:
        ort.InferenceSession(str(gpt2_bundle / "target.kv_commit.onnx"), providers=["CUDAExecutionProvider"])
        ort_cuda = "CUDAExecutionProvider" in ort.InferenceSession(
            str(gpt2_bundle / "target.kv_commit.onnx"), providers=["CUDAExecutionProvider"]).get_providers()
    except Exception:
        ort_cuda = False
    if ort_cuda:
        pytest.skip("CUDA works on this machine")
    _user_error(["run", "--model", str(gpt2_bundle), "--prompt", "hi", "--provider", "cuda"], "cuda")


def test_unknown_model_type(tmp_path):
    config = GPTNeoXConfig(vocab_size=tiny_models.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    src = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(src)
    tiny_models.train_tokenizer(["<|endoftext|>"])  # a tokenizer is needed for loading
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tiny_models.train_tokenizer(["<|endoftext|>"]),
                            eos_token="<|endoftext|>").save_pretrained(src)
    line = _user_error(["export", str(src), "--draft", "none", "-o", str(tmp_path / "out")], "gpt_neox")
    assert "gpt2" in line and "llama" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _user_error(["export", "specx-test/no-such-model", "-o", str(tmp_path / "out")], "hub")
    assert not (tmp_path / "out").exists()


def test_default_gpt2_draft_needs_the_hub(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _user_error(["export", str(gpt2_dir), "-o", str(tmp_path / "out")], "distilgpt2")
    assert not (tmp_path / "out").exists()


def test_llama_needs_explicit_draft(llama_dir, tmp_path):
    _user_error(["export", str(llama_dir), "-o", str(tmp_path / "out")], "--draft")


def test_incompatible_draft(gpt2_dir, llama_dir, tmp_path):
    _user_error(["export", str(gpt2_dir), "--draft", str(llama_dir), "-o", str(tmp_path / "out")], "draft")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(gpt2_dir, tmp_path, monkeypatch):
    from specx.errors import ExportError
    from specx.exporter import pipeline

    def broken(*args, **kwargs):
        raise ExportError("validation failed on purpose")

    monkeypatch.setattr(pipeline, "validate_decoder", broken)
    _user_error(["export", str(gpt2_dir), "--draft", "none", "-o", str(tmp_path / "out")], "on purpose")
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf(tmp_path):
    _user_error(["export", str(tmp_path / "model.gguf"), "--draft", "none"], "does not exist")


def test_missing_ngram_corpus(gpt2_dir, tmp_path):
    _user_error(["export", str(gpt2_dir), "--draft", "none", "--ngram-corpus", str(tmp_path / "nope.txt"),
                 "-o", str(tmp_path / "out")], "nope.txt")
    assert not (tmp_path / "out").exists()


def test_bench_table_and_json(gpt2_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = _ok(["bench", str(gpt2_bundle), "--limit", "2", "--temperatures", "0", "--max-new-tokens", "12",
                  "--json", str(out)])
    for mode in ("autoregressive", "speculative", "staged", "ngram"):
        assert mode in result.stdout
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 * 4 and {r["mode"] for r in data["summary"]} == {"autoregressive", "speculative",
                                                                                     "staged", "ngram"}
    assert all(r["identical"] for r in data["rows"])  # greedy: every mode reproduces plain decoding
    assert all(r["speedup"] == 1.0 for r in data["rows"] if r["mode"] == "autoregressive")


def test_bench_prompts_file_and_bad_mode(llama_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one two\nthe quick brown\n")
    result = _ok(["bench", str(llama_bundle), "--prompts", str(prompts), "--temperatures", "0,1",
                  "--max-new-tokens", "6"])
    assert result.stdout.count("autoregressive") == 2  # one summary line per temperature
    _user_error(["bench", str(llama_bundle), "--modes", "speculative"], "cannot run mode")
    _user_error(["bench", str(llama_bundle), "--prompts", str(tmp_path / "missing.txt")], "does not exist")


def test_run_compare_prints_the_measured_speedup(gpt2_same_draft_bundle):
    result = runner.invoke(app, ["run", "--model", str(gpt2_same_draft_bundle), "--prompt", "one two",
                                 "--max-new-tokens", "12", "--ignore-eos", "--mode", "speculative", "--compare"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "vs plain decoding" in l)
    assert line.startswith("[speculative vs plain decoding on this prompt: ") and "identical output" in line


def test_bench_plot_writes_a_png(gpt2_bundle, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    _ok(["bench", str(gpt2_bundle), "--limit", "2", "--temperatures", "0,1", "--max-new-tokens", "6",
         "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_tune_writes_the_default_that_run_uses(gpt2_bundle, tmp_path):
    bundle = _copy(gpt2_bundle, tmp_path)
    result = _ok(["bench", str(bundle), "--tune", "--limit", "2", "--temperatures", "0", "--max-new-tokens", "8",
                  "--modes", "speculative"])
    tuned = json.loads((bundle / "manifest.json").read_text())["tuning"]["greedy"]
    assert tuned["mode"] in ("autoregressive", "speculative") and "cores" in tuned["machine"]
    assert "written to" in result.stdout
    assert "tuned    greedy" in _ok(["info", str(bundle)]).stdout
    stats = json.loads(_ok(["run", "--model", str(bundle), "--prompt", "one two", "--max-new-tokens", "8",
                            "--json"]).stdout)["stats"]
    assert stats["mode"] == tuned["mode"]
    if tuned["mode"] != "autoregressive":
        assert (stats["tree_budget"], stats["tree_depth"], stats["tree_threshold"], stats["tree_floor"]) == \
            (tuned["tree_budget"], tuned["tree_depth"], tuned["tree_threshold"], tuned["tree_floor"])
    explicit = json.loads(_ok(["run", "--model", str(bundle), "--prompt", "one two", "--max-new-tokens", "8",
                               "--mode", "speculative", "--tree-budget", "3", "--tree-depth", "3",
                               "--json"]).stdout)["stats"]
    assert (explicit["tree_budget"], explicit["tree_depth"]) == (3, 3)  # flags still override the tuned default


def test_bench_against_peers(gpt2_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = _ok(["bench", str(gpt2_bundle), "--limit", "2", "--temperatures", "0", "--max-new-tokens", "8",
                  "--modes", "speculative", "--against", "transformers,llama.cpp,nonesuch", "--json", str(out)])
    assert "transformers" in result.stdout  # the peer's line in the same table
    assert "--against llama.cpp: skipped" in result.output and "unknown peer" in result.output
    rows = [r for r in json.loads(out.read_text())["rows"] if r["mode"] == "transformers"]
    assert len(rows) == 2 and all(r["identical"] for r in rows)  # transformers greedy == specx greedy, token for token

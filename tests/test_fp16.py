"""fp16 bundles (for CUDA): exported, validated against PyTorch fp16, runnable through the same runtime path."""

from __future__ import annotations

import json

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

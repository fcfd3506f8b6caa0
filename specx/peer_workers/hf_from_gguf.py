"""Turn a GGUF into a plain Hugging Face model directory (fp32 safetensors + tokenizer), any family transformers
reads from GGUF.

Run with a peer venv's python (needs transformers, gguf, accelerate, torch); specx.peers_genai and
benchmarks/peers/setup-genai.sh run it by path, it imports nothing from specx:

    python hf_from_gguf.py GGUF_FILE OUT_DIR

transformers dequantizes a GGUF on load but refuses ``save_pretrained`` on such a model, so the weights are copied
into a fresh model built from the same config and saved from there. The GGUF loader leaves
``quantization_config: {quant_method: gguf}`` in the config, which other tools (onnxruntime-genai's builder) reject,
so it is dropped from the saved config.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    gguf, out = Path(argv[0]).resolve(), Path(argv[1])
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        print(f"exists: {out}")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    # With tied embeddings the GGUF has no separate lm_head; anything else missing is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.eval()

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

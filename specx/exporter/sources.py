"""Loading a model source: a Hugging Face hub id, a local model directory, or a local .gguf file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specx.errors import SourceError
from specx.graphs.precision import PRECISIONS

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # by activations


@dataclass(frozen=True)
class LoadedModel:
    source: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_source(source: str, dtype: str = "fp32") -> LoadedModel:
    path = Path(source).expanduser()
    if source.lower().endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise SourceError(f"GGUF file {path} does not exist")
        location, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is not a Hugging Face model directory (no config.json)")
        location, kwargs = str(path), {}
    else:
        location, kwargs = source, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=TORCH_DTYPES[PRECISIONS[dtype].activations], **kwargs)
    except OSError as exc:
        if path.exists():
            raise SourceError(f"cannot load {source}: {exc}") from exc
        raise SourceError(
            f"cannot load {source!r}: the Hugging Face hub is unreachable or has no such model, and no local copy "
            "is cached; pass a local model directory or .gguf file, or connect to the hub"
        ) from exc
    if not tokenizer.is_fast:
        raise SourceError(f"{source} has no fast (tokenizers) tokenizer, which the runtime needs")
    model.eval()
    return LoadedModel(source=source, model=model, tokenizer=tokenizer)

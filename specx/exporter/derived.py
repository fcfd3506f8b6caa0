"""Drafts derived from the target itself, for targets without a small sibling.

    self:layers=K        the target's first K layers + final norm + head (same weights, exact torch parity)
    self:int8, self:int4 the target graph with weight-only quantized MatMuls (MatMulNBits, accuracy_level 4)
    self:layers=K,int4   both: a shallow copy, quantized
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, PreTrainedModel

from specx.errors import InvalidArgumentError

PREFIX = "self:"
QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class DerivedDraft:
    spec: str  # as the user wrote it, recorded in the manifest
    layers: int | None  # keep the first K layers, or None for all
    bits: int | None  # weight-only quantization, or None

    @classmethod
    def parse(cls, spec: str) -> "DerivedDraft":
        if not spec.startswith(PREFIX):
            raise InvalidArgumentError(f"not a derived draft: {spec!r}")
        layers = bits = None
        for part in filter(None, spec[len(PREFIX):].split(",")):
            if part.startswith("layers="):
                value = part[len("layers="):]
                if not value.isdigit() or int(value) < 1:
                    raise InvalidArgumentError(f"{spec}: layers=K needs a positive integer K")
                layers = int(value)
            elif part in QUANT_BITS:
                bits = QUANT_BITS[part]
            else:
                raise InvalidArgumentError(
                    f"unknown derived draft part {part!r} in {spec!r}; use self:layers=K, self:int8, self:int4 "
                    "or a combination such as self:layers=8,int4"
                )
        if layers is None and bits is None:
            raise InvalidArgumentError(f"{spec}: say what to derive: self:layers=K, self:int8 or self:int4")
        return cls(spec, layers, bits)


def truncate_layers(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A new model with the first ``layers`` decoder layers of ``model`` (and its embeddings, final norm, head)."""
    total = model.config.num_hidden_layers
    if layers >= total:
        raise InvalidArgumentError(f"self:layers={layers} must keep fewer layers than the target's {total}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    shallow = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, _ = shallow.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise InvalidArgumentError(f"cannot derive self:layers={layers}: weights missing for {missing[:3]}")
    return shallow.eval()

"""The PyTorch reference: a thin module with the signature of specx decoder graphs (growing KV, not static), against
which every exported graph is validated."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from specx.exporter.adapters import ArchitectureAdapter


class TreeDecoder(torch.nn.Module):
    """forward(input_ids, position_ids, tree_mask, *past) -> (logits, *present).

    The boolean tree mask becomes the 4-D additive mask transformers accepts unchanged, so one pass can score any
    token tree against the cache.
    """

    def __init__(self, model: PreTrainedModel, adapter: ArchitectureAdapter):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # input_ids, position_ids: (batch, seq); tree_mask: (batch, 1, seq, past+seq) bool
        # past: (k0, v0, k1, v1, ...) each (batch, kv_heads, past, head_dim)
        dtype = self.model.dtype
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
        zero = torch.tensor(0.0, dtype=dtype)
        bias = torch.where(tree_mask, zero, blocked)  # (batch, 1, seq, past+seq)
        window_bias = {w: torch.where(tree_mask & (self._distance(position_ids, tree_mask) < w), zero, blocked)
                       for w in self.adapter.family.windows}
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self.adapter.reference_mask(bias, window_bias),
            cache=self.adapter.make_cache(past),
            use_cache=True,
        )
        logits = out.logits.float()  # (batch, seq, vocab)
        return (logits, *self.adapter.flatten_cache(out.cache))

    @staticmethod
    def _distance(position_ids: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
        """pos(query) - pos(key), (batch, 1, seq, total): cached rows sit at their row, this pass's at its positions."""
        batch, seq = position_ids.shape
        past = tree_mask.shape[-1] - seq
        keys = torch.cat([torch.arange(past).expand(batch, past), position_ids], dim=1)  # (batch, total)
        return position_ids[:, None, :, None] - keys[:, None, None, :]

"""The feature draft in PyTorch: exactly the computation of ``specx.graphs.feature_draft`` (a parity test holds
them together), plus the masked multi-step attention the training-time unroll needs.

A pass takes, per row t: a token x_t and a state s_t (the target's features at t - 1 fused, or the draft's own
hidden state of the row before); it returns logits for x_{t+1} over the draft vocabulary and the row's hidden state.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from specx.graphs.decoder import LayerWeights, Linear, Norm
from specx.graphs.feature_draft import DRAFT_NORM_EPS, FeatureDraftWeights


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = DRAFT_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class DraftLayer(nn.Module):
    """One llama-style decoder layer (RMSNorm, GQA + rotary, SwiGLU), split where the attention happens so that the
    unroll can attend over keys of several steps."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attn_norm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.mlp_norm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, hidden) -> q (batch, heads, seq, hd), k and v (batch, heads, seq, hd) (kv repeated)."""
        batch, seq, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x: the layer's input; attended (batch, heads, seq, hd) -> the layer's output (batch, seq, hidden)."""
        batch, _, seq, _ = attended.shape
        r = x + self.o_proj(attended.transpose(1, 2).reshape(batch, seq, -1))
        h = self.mlp_norm(r)
        return r + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class FeatureDraftModel(nn.Module):
    def __init__(self, embed: torch.Tensor, feature_width: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 ffn: int, draft_vocab: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor, num_layers: int = 1):
        super().__init__()
        hidden = embed.shape[1]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.register_buffer("embed", embed.detach().clone(), persistent=False)  # frozen: the target's
        self.register_buffer("rope_cos", rope_cos.detach().clone(), persistent=False)  # (positions, head_dim / 2)
        self.register_buffer("rope_sin", rope_sin.detach().clone(), persistent=False)
        self.feature_chunks = feature_width // hidden
        self.feature_norm = RMSNorm(hidden)  # each layer's features normalised (their scales differ by 100x and
        self.feature_norm.weight = nn.Parameter(torch.ones(self.feature_chunks, hidden))  # more); one gain each
        self.fuse = nn.Linear(feature_width, hidden, bias=False)
        self.embed_norm = RMSNorm(hidden)  # EAGLE-3: token embedding and state normalised before they meet
        self.state_norm = RMSNorm(hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(DraftLayer(hidden, num_heads, num_kv_heads, head_dim, ffn)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, draft_vocab, bias=False)

    # -- pieces ------------------------------------------------------------------------------------------------
    def fuse_features(self, features: torch.Tensor) -> torch.Tensor:
        """features (batch, seq, chunks * hidden) -> state (batch, seq, hidden): each chunk RMS-normalised."""
        batch, seq, _ = features.shape
        chunks = features.view(batch, seq, self.feature_chunks, -1)
        return self.fuse(self.feature_norm(chunks).reshape(batch, seq, -1))

    def layer_input(self, tokens: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq), state (batch, seq, hidden) -> the first layer's input (batch, seq, hidden)."""
        return self.fc(torch.cat([self.embed_norm(self.embed[tokens]), self.state_norm(state)], dim=-1))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (batch, seq) -> cos, sin (batch, 1, seq, hd / 2)."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The last layer's output (batch, seq, hidden) -> logits (batch, seq, draft_vocab)."""
        return self.head(self.norm(out))

    def forward(self, tokens: torch.Tensor, state: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass with no cache: mask (batch, 1, seq, seq) bool, True where row i may attend to row j."""
        x = self.layer_input(tokens, state)
        cos, sin = self.rope(positions)
        for layer in self.layers:
            q, k, v = layer.qkv(x, cos, sin)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
            x = layer.finish(x, attended)
        return self.logits(x), x

    # -- export ------------------------------------------------------------------------------------------------
    def to_weights(self) -> FeatureDraftWeights:
        """The graph builder's layout: x @ W matrices, q/k/v and nothing else packed."""
        def t(linear: nn.Linear):  # (out, in) -> (in, out)
            return linear.weight.detach().float().numpy().T.copy()

        def norm(module: RMSNorm) -> Norm:
            return Norm(module.weight.detach().numpy().copy())

        layers = tuple(
            LayerWeights(attn_norm=norm(layer.attn_norm),
                         qkv=Linear(np.concatenate([t(layer.q_proj), t(layer.k_proj), t(layer.v_proj)], axis=1)),
                         o=Linear(t(layer.o_proj)), mlp_norm=norm(layer.mlp_norm), gate=Linear(t(layer.gate_proj)),
                         up=Linear(t(layer.up_proj)), down=Linear(t(layer.down_proj)))
            for layer in self.layers)
        gains = self.feature_norm.weight.detach().numpy().reshape(-1, 1)  # folded into the fuse rows
        return FeatureDraftWeights(
            embed=self.embed.float().numpy(), fuse=Linear(t(self.fuse) * gains), fc=Linear(t(self.fc)),
            layers=layers, embed_norm=norm(self.embed_norm), state_norm=norm(self.state_norm),
            feature_chunks=self.feature_chunks, final_norm=norm(self.norm), head=t(self.head),
            rope_cos=self.rope_cos.float().numpy(), rope_sin=self.rope_sin.float().numpy())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves not interleaved (as GroupQueryAttention's do_rotary with rotary_interleaved=0)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def unrolled_logits(model: FeatureDraftModel, tokens: torch.Tensor, fused: torch.Tensor,
                    steps: int) -> list[torch.Tensor]:
    """The training-time unroll: step 0 reads the target's (fused) features; step k reads the draft's own hidden
    states of step k - 1, shifted one row, as a tree level k deep does at run time.

    tokens (batch, seq); fused (batch, seq, hidden) = fuse(target features at t - 1). Row t of step k attends to
    step 0's rows <= t - k (the committed prefix, which had the target's features) and to the rows t - k + j of
    steps j = 1..k (its drafted ancestors and itself). Returns logits (batch, seq, draft_vocab) per step; rows
    t < k of step k have no valid input and must be left out of the loss.
    """
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device)[None].expand(batch, seq)
    cos, sin = model.rope(positions)
    rows = torch.arange(seq, device=tokens.device)
    keys: list[list[torch.Tensor]] = [[] for _ in model.layers]  # per layer, per step
    values: list[list[torch.Tensor]] = [[] for _ in model.layers]
    out: list[torch.Tensor] = []
    state = fused
    for k in range(steps):
        blocks = [rows[None, :] <= rows[:, None] - k]  # step 0: the prefix up to t - k
        blocks += [rows[None, :] == rows[:, None] - k + j for j in range(1, k + 1)]  # step j: one row each
        mask = torch.cat(blocks, dim=1)  # (seq, (k + 1) * seq)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # rows with nothing to see (t < k): any row, dropped later
        x = model.layer_input(tokens, state)
        for i, layer in enumerate(model.layers):
            q, key, value = layer.qkv(x, cos, sin)
            keys[i].append(key)
            values[i].append(value)
            attended = F.scaled_dot_product_attention(q, torch.cat(keys[i], dim=2), torch.cat(values[i], dim=2),
                                                      attn_mask=mask, scale=model.head_dim ** -0.5)
            x = layer.finish(x, attended)
        out.append(model.logits(x))
        state = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)  # row t reads row t - 1's
    return out

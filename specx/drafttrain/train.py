"""Training the feature draft on a distillation set, and measuring it.

Loss per unroll step k (weights UNROLL_DECAY ** k): soft cross-entropy between the target's next-token distribution
(its top TOP_K probabilities, restricted to the draft vocabulary) and the draft's, over rows whose target argmax the
draft vocabulary holds (EAGLE-3's recipe, with the top-K distillation of HASS).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from specx.drafttrain.checkpoint import Position, load_checkpoint, save_checkpoint
from specx.drafttrain.data import DistillationSet, Progress, no_progress
from specx.drafttrain.distributed import Ranks, data_parallel
from specx.drafttrain.loss import sparse_soft_cross_entropy
from specx.drafttrain.model import DraftLayer, FeatureDraftModel, unrolled_logits
from specx.drafttrain.precision import fast_dtype
from specx.drafttrain.workdir import crash_point, written
from specx.exporter.adapters import ArchitectureAdapter

WARMUP_STEPS = 20
MIN_LR_FRACTION = 0.1  # cosine decay down to this share of the peak
# torch.compile costs ~10-30 s up front and saved ~20% of a step on 2 CPU cores (docs/benchmarks.md): it pays
# from a few hundred full steps on; tiny runs (tests) stay in eager mode.
COMPILE_MIN_TOKEN_PASSES = 1_000_000
CHECKPOINT_MINUTES = 10.0  # a killed run loses at most this much training


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 8.0  # training passes, not text, limited agreement in the hour on a CPU (docs/benchmarks.md)
    batch: int = 8  # texts per optimiser step
    lr: float = 1e-3
    unroll: int = 3  # training-time unroll: steps on the draft's own states
    unroll_decay: float = 0.8
    clip: float = 0.5
    hard_label: float = 0.0  # share of each row's target mass moved onto the target's argmax (0: soft labels only)
    weight_decay: float = 0.0
    seed: int = 0
    mixed_precision: bool | None = None  # bfloat16 autocast; None: where the device runs it faster (precision.py)
    compile: bool | None = None  # torch.compile the loss; None: for runs of COMPILE_MIN_TOKEN_PASSES or more


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low / middle / high layers {2, L/2, L-3}, clamped and distinct for shallow models."""
    picks = [min(2, num_layers - 1), num_layers // 2, max(0, num_layers - 3)]
    return tuple(sorted(set(picks)))


def new_draft(model: PreTrainedModel, adapter: ArchitectureAdapter, feature_layers: tuple[int, ...],
              vocab_map: np.ndarray, seed: int, num_layers: int = 1) -> FeatureDraftModel:
    """A draft with the target's sizes: embedding frozen from the target, head rows from the target's head, final
    norm from the target's; its ``num_layers`` layers start from the target's last ones where the families match
    (llama)."""
    torch.manual_seed(seed)
    spec = adapter.spec
    weights = adapter.weights(model)
    ffn = weights.layers[-1].down.weight.shape[0]
    cos, sin = _rope_tables(weights, spec.head_dim, spec.max_positions)
    embed = torch.from_numpy(weights.embed)
    draft = FeatureDraftModel(embed, len(feature_layers) * spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                              spec.head_dim, ffn, int(vocab_map.size), torch.from_numpy(cos), torch.from_numpy(sin),
                              num_layers)
    head = weights.lm_head if weights.lm_head is not None else weights.embed.T  # (hidden, vocab)
    with torch.no_grad():
        draft.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(head[:, vocab_map].T)))
        if adapter.family.norm == "rms":
            draft.norm.weight.copy_(torch.from_numpy(weights.final_norm.weight))
        if adapter.family.mlp == "swiglu" and adapter.family.norm == "rms":
            for layer, source in zip(draft.layers, weights.layers[-num_layers:]):
                _copy_layer(layer, source, spec)
    return draft


def _copy_layer(into: DraftLayer, layer, spec) -> None:
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    qkv = torch.from_numpy(layer.qkv.weight.T.copy())  # (q + 2 kv, hidden)
    into.q_proj.weight.copy_(qkv[:q_size])
    into.k_proj.weight.copy_(qkv[q_size:q_size + kv_size])
    into.v_proj.weight.copy_(qkv[q_size + kv_size:])
    into.o_proj.weight.copy_(torch.from_numpy(layer.o.weight.T.copy()))
    into.gate_proj.weight.copy_(torch.from_numpy(layer.gate.weight.T.copy()))
    into.up_proj.weight.copy_(torch.from_numpy(layer.up.weight.T.copy()))
    into.down_proj.weight.copy_(torch.from_numpy(layer.down.weight.T.copy()))
    into.attn_norm.weight.copy_(torch.from_numpy(layer.attn_norm.weight))
    into.mlp_norm.weight.copy_(torch.from_numpy(layer.mlp_norm.weight))


def _rope_tables(weights, head_dim: int, positions: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """The target's rotary tables where it has full-width ones, else the standard ones (the draft rotates every
    dim of its heads: a partial-rotary target's table is too narrow)."""
    if weights.rope_cos is not None and weights.rope_cos.shape[1] * 2 == head_dim:
        return weights.rope_cos, weights.rope_sin
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(positions)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# -- batches ----------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    tokens: torch.Tensor  # (batch, seq) int64
    features: torch.Tensor  # (batch, seq, F): the target's features at t - 1 (zeros at t = 0)
    target_ids: torch.Tensor  # (batch, seq, TOP_K) draft ids of the target's top tokens, -1 outside the vocabulary
    target_probs: torch.Tensor  # (batch, seq, TOP_K)
    target_top: torch.Tensor  # (batch, seq) the target's argmax (target ids), -1 on padding
    real: torch.Tensor  # (batch, seq) bool: rows of a text, not padding
    valid: torch.Tensor  # (batch, seq) bool: real rows whose target argmax the draft can produce

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def make_batch(data: DistillationSet, texts: np.ndarray, to_draft: np.ndarray, width: int | None = None) -> Batch:
    """Texts padded to ``width`` (default: the longest of them; a fixed width keeps compiled shapes fixed)."""
    width = max(data.tokens[i].size for i in texts) if width is None else width
    n, feature_width, top = len(texts), data.features.shape[1], data.top_ids.shape[1]
    tokens = np.zeros((n, width), np.int64)
    features = np.zeros((n, width, feature_width), np.float32)
    ids = np.full((n, width, top), -1, np.int64)
    probs = np.zeros((n, width, top), np.float32)
    target_top = np.full((n, width), -1, np.int64)
    real = np.zeros((n, width), bool)
    for row, i in enumerate(texts):
        start, length = int(data.offsets[i]), data.tokens[i].size
        tokens[row, :length] = data.tokens[i]
        features[row, 1:length] = data.features[start:start + length - 1]
        ids[row, :length] = to_draft[data.top_ids[start:start + length]]
        probs[row, :length] = data.top_probs[start:start + length]
        target_top[row, :length] = data.top_ids[start:start + length, 0]
        real[row, :length] = True
    valid = real & (ids[:, :, 0] >= 0)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(features), torch.from_numpy(ids),
                 torch.from_numpy(probs), torch.from_numpy(target_top), torch.from_numpy(real),
                 torch.from_numpy(valid))


def unroll_loss(draft: FeatureDraftModel, batch: Batch, config: TrainConfig,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """Each unroll step's mean soft cross-entropy over its rows in the loss, weighted by UNROLL_DECAY ** k.
    ``counts`` (unroll,): the rows in the loss at each step in the whole global batch (default: this batch's): a
    process of a data-parallel job, holding a slice of the batch, returns its share of the global loss."""
    fused = draft.fuse_features(batch.features)
    total = torch.zeros((), device=batch.tokens.device)
    weights = torch.zeros((), device=batch.tokens.device)
    mass = label_mass(batch, config.hard_label)  # (batch, seq, TOP_K)
    for k, logits in enumerate(unrolled_logits(draft, batch.tokens, fused, config.unroll)):
        valid = batch.valid.clone()
        valid[:, :k] = False
        per_row = sparse_soft_cross_entropy(logits, batch.target_ids.clamp(min=0), mass)  # (batch, seq)
        count = valid.sum() if counts is None else counts[k]
        total = total + config.unroll_decay ** k * torch.where(valid, per_row, 0.0).sum() / count.clamp(min=1)
        weights = weights + config.unroll_decay ** k * (count > 0)
    return total / weights.clamp(min=1e-9)


def valid_counts(data: DistillationSet, texts: np.ndarray, to_draft: np.ndarray, steps: int) -> np.ndarray:
    """(steps,) float32: the rows of ``texts`` that unroll step k puts in the loss (positions t >= k whose target
    argmax the draft vocabulary holds), as unroll_loss counts them in a batch of these texts."""
    counts = np.zeros(steps, np.float32)
    for i in texts:
        start, length = int(data.offsets[i]), data.tokens[i].size
        positions = np.flatnonzero(to_draft[data.top_ids[start:start + length, 0]] >= 0)  # (valid rows,)
        counts += [np.count_nonzero(positions >= k) for k in range(steps)]
    return counts


def label_mass(batch: Batch, hard: float) -> torch.Tensor:
    """The target probability each of its top ids carries in the loss, 0 outside the draft vocabulary; ``hard`` of
    it moved onto the argmax (ids are sorted, most likely first), which greedy acceptance is decided by."""
    inside = batch.target_ids >= 0
    mass = batch.target_probs * inside  # (batch, seq, TOP_K)
    if hard:
        mass = (1 - hard) * mass
        mass[..., 0] += hard * inside[..., 0]
    return mass


# -- training ---------------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    tokens_seen: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often train() saves its state: the main process writes, every process resumes from it."""

    path: Path
    identity: str  # what the training is: a checkpoint of another training is ignored
    every_seconds: float = CHECKPOINT_MINUTES * 60
    every_steps: int = 0  # also every this many steps (0: by time alone)

    def due(self, steps: int, since: float) -> bool:
        return (self.every_steps > 0 and steps % self.every_steps == 0) or since >= self.every_seconds


class _Objective(nn.Module):
    """The loss as a module's forward: what DistributedDataParallel wraps (it synchronises the gradients of the
    passes that go through a forward)."""

    def __init__(self, draft: FeatureDraftModel, loss_of: Callable, config: TrainConfig):
        super().__init__()
        self.draft, self.loss_of, self.config = draft, loss_of, config

    def forward(self, batch: Batch, counts: torch.Tensor) -> torch.Tensor:
        return self.loss_of(self.draft, batch, self.config, counts)


def train(draft: FeatureDraftModel, data: DistillationSet, vocab_map: np.ndarray, target_vocab: int,
          config: TrainConfig, progress: Progress = no_progress, checkpointing: Checkpointing | None = None,
          ranks: Ranks = Ranks()) -> TrainLog:
    """Train ``draft`` in place. With ``checkpointing``, it continues from the checkpoint there (the same draft as a
    run never stopped) and saves one as it goes. In a data-parallel job each process takes a slice of every global
    batch of ``config.batch`` texts and the gradients are averaged (DistributedDataParallel)."""
    rng = np.random.default_rng(config.seed)
    to_draft = target_to_draft(vocab_map, target_vocab)
    texts = len(data.tokens)
    per_epoch = max(1, texts // config.batch)
    total_steps = max(1, int(per_epoch * config.epochs))
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(0.9, 0.95), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total_steps))
    where = next(draft.parameters()).device
    device = where.type
    mixed = fast_dtype(device) == torch.bfloat16 if config.mixed_precision is None else config.mixed_precision
    passes = data.num_tokens * config.epochs
    compiled = passes >= COMPILE_MIN_TOKEN_PASSES if config.compile is None else config.compile
    loss_of = torch.compile(unroll_loss, dynamic=False) if compiled and _can_compile(device) else unroll_loss
    width = max(t.size for t in data.tokens)  # one batch shape for the whole run
    position = Position(0, np.empty(0, np.int64), asdict(TrainLog()))
    if checkpointing is not None:
        position = load_checkpoint(checkpointing.path, checkpointing.identity, draft, optimizer, schedule,
                                   rng) or position
    objective = data_parallel(_Objective(draft, loss_of, config), ranks, str(where))
    log, order = TrainLog(**position.log), position.order
    bar = progress("training the draft (steps)", total_steps)
    bar.update(position.step)
    start = saved = time.perf_counter()
    seconds_before = log.seconds
    draft.train()
    try:
        for step in range(position.step, total_steps):
            if order.size < config.batch:
                order = np.concatenate([order, rng.permutation(texts)])
            chosen, order = order[: config.batch], order[config.batch:]
            batch = make_batch(data, _share(chosen, ranks), to_draft, width).to(where)
            counts = valid_counts(data, chosen, to_draft, config.unroll)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=mixed):
                loss = objective(batch, torch.from_numpy(counts).to(where))
            optimizer.zero_grad(set_to_none=True)
            with ranks.collective("a training step"):
                (loss * ranks.world_size).backward()  # DistributedDataParallel averages: the global loss's gradient
            torch.nn.utils.clip_grad_norm_(draft.parameters(), config.clip)
            optimizer.step()
            schedule.step()
            if step == 0 or step == total_steps - 1:
                value = float(ranks.total(loss.detach().float(), "summing the loss"))
                log.first_loss = value if step == 0 else log.first_loss
                log.last_loss = value
            log.steps += 1
            log.tokens_seen += int(counts[0])
            log.seconds = seconds_before + time.perf_counter() - start
            bar.update(1)
            if checkpointing is not None and ranks.main and checkpointing.due(step + 1, time.perf_counter() - saved):
                save_checkpoint(checkpointing.path, checkpointing.identity, draft, optimizer, schedule, rng,
                                Position(step + 1, order, asdict(log)))
                written("checkpoint", step + 1, ranks.rank)
                saved = time.perf_counter()
            crash_point("step", step + 1, ranks.rank)
    finally:
        bar.close()
    draft.eval()
    log.seconds = seconds_before + time.perf_counter() - start
    return log


def _share(chosen: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This process's contiguous slice of a global batch (all of it in a job of one)."""
    return chosen[ranks.rank * chosen.size // ranks.world_size:(ranks.rank + 1) * chosen.size // ranks.world_size]


def _can_compile(device: str) -> bool:
    """torch.compile's code generators: a C++ compiler on CPU, Triton on CUDA. Without them, eager mode."""
    if device == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(name) for name in ("g++", "clang++", "c++"))


def _lr_factor(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def target_to_draft(vocab_map: np.ndarray, target_vocab: int) -> np.ndarray:
    """(target_vocab,) draft id of each target token, -1 where the draft vocabulary lacks it."""
    table = np.full(target_vocab, -1, np.int64)
    table[vocab_map] = np.arange(vocab_map.size)
    return table


def agreement(draft: FeatureDraftModel, data: DistillationSet, vocab_map: np.ndarray, target_vocab: int,
              steps: int) -> list[float]:
    """Share of held-out positions where the draft's argmax is the target's, per unroll step (step k: the draft
    k levels deep on its own states, as in a tree)."""
    to_draft = target_to_draft(vocab_map, target_vocab)
    hits = np.zeros(steps)
    counts = np.zeros(steps)
    with torch.no_grad():
        for start in range(0, len(data.tokens), 8):
            texts = np.arange(start, min(start + 8, len(data.tokens)))
            batch = make_batch(data, texts, to_draft)
            fused = draft.fuse_features(batch.features)
            for k, logits in enumerate(unrolled_logits(draft, batch.tokens, fused, steps)):
                guess = torch.from_numpy(vocab_map)[logits.argmax(-1)]
                rows = batch.real.clone()
                rows[:, :k] = False
                hits[k] += float((guess == batch.target_top)[rows].sum())
                counts[k] += float(rows.sum())
    return [float(h / c) if c else 0.0 for h, c in zip(hits, counts)]

"""Self-distillation data: the target writes its own training text, offline, then one teacher-forced pass records
what the draft learns from.

    sources of text (no hub, no downloaded data sets; never the benchmark prompts), written by the target in the
    fastest precision the device has (precision.py), which also computes the labels below
      chat      (models with a chat template) the target writes user requests on built-in topics, then answers
                them through its template, greedy or sampled
      opening   such a self-written request as plain text, continued without the template (how `specx run
                --prompt` and bench prompts are decoded)
      free      unconditional samples (from the BOS token, or an empty chat turn)
      random    a few random tokens, then a sample
      corpus    the user's files (--corpus), cut into windows
    in shards (a generation batch each) that each start from generators seeded by (seed, shard): the same texts
    whichever process writes a shard, and whenever; a round of shards per kind, then top-up rounds until every
    kind has its share of the budget
    teacher-forced pass over every text (batched, right-padded), in shards of whole texts
      features  (tokens, feature_width) float16   the inputs of the feature layers, per position
      top_ids   (tokens, TOP_K) int32             the target's most likely next tokens at each position
      top_probs (tokens, TOP_K) float16           and their probabilities (temperature 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

TOP_K = 32  # target probabilities kept per position (soft labels)
MAX_TEXT_TOKENS = 256  # longest training text (prompt + continuation)
REQUEST_TOKENS = 40  # a self-written user request
GENERATION_BATCH = 128  # measured on 2 cores, bf16: 835 tokens/s at 128, 595 at 64, 407 at 32 (fp32: 252 at 32)
FORWARD_BATCH = 8
RANDOM_PROMPT_TOKENS = 4
DEFAULT_SHARD_TOKENS = GENERATION_BATCH * MAX_TEXT_TOKENS  # per shard: the unit of resumption and of the work split
MAX_ROUNDS = 6  # rounds of text shards at most (texts come out about as long as planned: one top-up is the rule)
TEXTS_BAR = "target writing its training text (tokens)"
LABELS_BAR = "target pass over the text: features and distributions (tokens)"
TEXT_STREAM, ORDER_STREAM = 1, 2  # generators under the seed: (seed, TEXT_STREAM, shard), (seed, ORDER_STREAM)
SAMPLING_TEMPERATURE = 0.8
# Topics the target writes requests about: broad, and not the benchmark prompts (which it never sees).
TOPICS = (
    "Python programming", "JavaScript", "SQL databases", "Linux shell commands", "data structures", "algorithms",
    "cooking", "gardening", "world history", "physics", "chemistry", "biology", "astronomy", "mathematics",
    "personal finance", "travel", "fitness", "mental health", "music", "films", "books", "writing emails",
    "job interviews", "climate", "geography", "economics", "philosophy", "art", "languages", "pets", "sports",
    "cars", "software testing", "web development", "machine learning", "statistics", "poetry", "short stories",
    "recipes", "home repair", "productivity", "education", "law", "medicine", "space exploration", "electronics",
)
REQUEST_STYLES = (
    "Write one question a user might ask an AI assistant about {topic}. Only the question.",
    "Write a short task about {topic} that a user could give an assistant. Only the task.",
    "Ask me something difficult about {topic}.",
    "Write an instruction asking for a piece of code or a list related to {topic}.",
)

Progress = Callable[[str, int], "ProgressBar"]


class ProgressBar:
    """What the trainer reports to: a bar with a count and an ETA (rich's in the CLI)."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def no_progress(_: str, __: int) -> ProgressBar:
    return ProgressBar()


class ShardedRows:
    """The rows of one array kept in several shards (memory-mapped .npy files), read as one (rows, ...) array: a
    slice of rows is a view when it lies in one shard (a text's rows always do), else a copy; ``window`` narrows
    it without reading anything."""

    def __init__(self, parts: Sequence[np.ndarray], start: int = 0, stop: int | None = None,
                 bounds: np.ndarray | None = None):
        self.parts = list(parts)
        self.bounds = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]) if bounds is None else bounds
        self.start, self.stop = start, int(self.bounds[-1]) if stop is None else stop

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, stop: int) -> "ShardedRows":
        return ShardedRows(self.parts, self.start + start, self.start + stop, self.bounds)

    def __getitem__(self, key) -> np.ndarray:  # noqa: ANN001  (rows[, columns...])
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("sharded rows are read by contiguous slices")
        lo, hi, _ = rows.indices(len(self))
        lo, hi = self.start + lo, self.start + max(lo, hi)
        first = min(max(0, int(np.searchsorted(self.bounds, lo, side="right")) - 1), len(self.parts) - 1)
        pieces = []
        for i in range(first, len(self.parts)):
            if self.bounds[i] >= hi and pieces:
                break
            a = max(lo, self.bounds[i]) - self.bounds[i]
            b = max(a, min(hi, self.bounds[i + 1]) - self.bounds[i])
            pieces.append(self.parts[i][a:b][(slice(None), *rest)])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


Rows = np.ndarray | ShardedRows


@dataclass
class DistillationSet:
    tokens: list[np.ndarray]  # per text: (length,) int64
    features: Rows  # (total, feature_width) float16, texts back to back
    top_ids: Rows  # (total, TOP_K) int32
    top_probs: Rows  # (total, TOP_K) float16
    offsets: np.ndarray  # (texts + 1,) where each text starts in the flat arrays

    def arrays(self) -> dict[str, np.ndarray]:
        """What a shard file holds (plain arrays, no pickle): tokens flat, their lengths, the labels."""
        lengths = np.asarray([t.size for t in self.tokens], np.int64)
        flat = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int64)
        return {"tokens": flat, "lengths": lengths, "features": self.features[:], "top_ids": self.top_ids[:],
                "top_probs": self.top_probs[:]}

    @classmethod
    def from_shards(cls, shards: Sequence[dict[str, np.ndarray]]) -> "DistillationSet":
        """One set over shards written by ``arrays`` (memory-mapped or not), in order; nothing is copied."""
        tokens: list[np.ndarray] = []
        for shard in shards:
            starts = np.concatenate([[0], np.cumsum(shard["lengths"])])
            tokens += [shard["tokens"][starts[i]:starts[i + 1]] for i in range(shard["lengths"].size)]
        offsets = np.concatenate([[0], np.cumsum([t.size for t in tokens])]).astype(np.int64)
        return cls(tokens, *(ShardedRows([s[name] for s in shards]) for name in ("features", "top_ids", "top_probs")),
                   offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def head(self, tokens: int) -> "DistillationSet":
        """The first texts, about ``tokens`` tokens in all (a smaller budget from a larger set: the texts are in
        random order, so this is a random subset)."""
        count = int(np.searchsorted(self.offsets, tokens, side="left"))
        return self._subset(range(max(1, min(count, len(self.tokens)))))

    def split(self, held_out: int) -> tuple["DistillationSet", "DistillationSet"]:
        """The last ``held_out`` texts apart (for agreement measured on text the draft never trained on)."""
        cut = len(self.tokens) - held_out
        return self._subset(range(cut)), self._subset(range(cut, len(self.tokens)))

    def _subset(self, texts: range) -> "DistillationSet":
        start, end = int(self.offsets[texts.start]), int(self.offsets[texts.stop])
        return DistillationSet([self.tokens[i] for i in texts], _rows(self.features, start, end),
                               _rows(self.top_ids, start, end), _rows(self.top_probs, start, end),
                               self.offsets[texts.start: texts.stop + 1] - start)


def _rows(rows: Rows, start: int, end: int) -> Rows:
    return rows.window(start, end) if isinstance(rows, ShardedRows) else rows[start:end]


# -- writing the texts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextShard:
    """One generation batch: ``count`` texts of one kind, greedy or sampled."""

    index: int
    kind: str
    count: int
    greedy: bool


def text_shares(tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """Each kind's share of the token budget."""
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return {"chat": 0.4, "opening": 0.3, "free": 0.15, "random": 0.15}
    return {"free": 0.5, "random": 0.5}


def text_length(model: PreTrainedModel) -> int:
    """Tokens a written text has (prompt and continuation): MAX_TEXT_TOKENS, or the model's context if shorter."""
    context = int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
                  or MAX_TEXT_TOKENS)
    return min(MAX_TEXT_TOKENS, context)


def next_round(budget: int, shares: dict[str, float], written: Sequence[tuple[TextShard, int]], length: int,
               shard_tokens: int = DEFAULT_SHARD_TOKENS) -> list[TextShard]:
    """The next round of shards: for each kind short of its share of ``budget``, enough texts to cover the rest at
    the length its texts came out so far (``length`` before any); [] once every kind has its share. ``written``:
    (shard, tokens it holds) for every shard of the earlier rounds. A plan that depends on the shards' content alone:
    the same whichever processes write them."""
    per_shard = max(1, min(GENERATION_BATCH, shard_tokens // length))
    shards: list[TextShard] = []
    index = len(written)
    for kind, share in shares.items():
        done = [(shard, tokens) for shard, tokens in written if shard.kind == kind]
        tokens, texts = sum(t for _, t in done), sum(shard.count for shard, _ in done)
        short = int(budget * share) - tokens
        if short <= 0:
            continue
        need = math.ceil(short / (tokens / texts if tokens else length))
        for start in range(0, need, per_shard):
            greedy = kind != "free" and index % 2 == 1  # free samples share one prompt: always sampled
            shards.append(TextShard(index, kind, min(per_shard, need - start), greedy))
            index += 1
    return shards


def write_text_shard(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, shard: TextShard,
                     seed: int) -> list[np.ndarray]:
    """The shard's texts, from generators seeded by (seed, shard index) alone."""
    sequence = np.random.SeedSequence([seed, TEXT_STREAM, shard.index])
    torch.manual_seed(int(sequence.generate_state(1, np.uint64)[0]))  # the sampler draws from torch's generator
    prompts = _prompts(shard.kind, model, tokenizer, np.random.default_rng(sequence), shard.count)
    return _continue(model, tokenizer, prompts, MAX_TEXT_TOKENS, shard.greedy)


def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: int, rng: np.random.Generator,
                   progress: Progress = no_progress) -> list[np.ndarray]:
    """Texts the target writes itself, about ``tokens`` tokens in all (at least that many, within MAX_ROUNDS):
    chat (where a template exists), free and random-prompt samples; half greedy, half sampled. In memory, all
    shards in one go (train-draft writes them to its work directory one by one: specx.drafttrain.phases)."""
    seed = int(rng.integers(2 ** 31))
    shares, length = text_shares(tokenizer), text_length(model)
    bar = progress(TEXTS_BAR, tokens)
    texts: list[np.ndarray] = []
    written: list[tuple[TextShard, int]] = []
    try:
        for _ in range(MAX_ROUNDS):
            shards = next_round(tokens, shares, written, length)
            for shard in shards:
                batch = write_text_shard(model, tokenizer, shard, seed)
                texts += batch
                written.append((shard, sum(t.size for t in batch)))
                bar.update(written[-1][1])
            if not shards:
                break
    finally:
        bar.close()
    return texts


def _prompts(kind: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator,
             count: int) -> list[list[int]]:
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if kind in ("chat", "opening"):
        asks = [_chat_ids(tokenizer, REQUEST_STYLES[rng.integers(len(REQUEST_STYLES))].format(
            topic=TOPICS[rng.integers(len(TOPICS))])) for _ in range(count)]
        requests = _continue(model, tokenizer, asks, REQUEST_TOKENS, greedy=False, new_only=True)
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip().split("\n")[0] or "Hello!" for r in requests]
        if kind == "chat":
            return [_chat_ids(tokenizer, t) for t in texts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # as the runtime encodes
    if kind == "free":
        return [start or [int(rng.integers(tokenizer.vocab_size))] for _ in range(count)]
    specials = set(tokenizer.all_special_ids)
    ordinary = [t for t in range(min(tokenizer.vocab_size, len(tokenizer))) if t not in specials]
    return [start + [int(t) for t in rng.choice(ordinary, RANDOM_PROMPT_TOKENS)] for _ in range(count)]


def _chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _continue(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
              max_tokens: int, greedy: bool, new_only: bool = False) -> list[np.ndarray]:
    """Batched generation (left-padded). Requests (``new_only``) stop at their first end-of-sequence token; texts run
    on past it to ``max_tokens`` (what the target writes after its end token is its own text too, e.g. the next chat
    turn), so that no row of a batch idles while the longest one finishes. ``model``: the PyTorch model, or a
    writer with ``generate_rows`` (the graph teacher: specx.drafttrain.teacher.GraphWriter)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    width = max(len(p) for p in prompts)
    context = int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
                  or max_tokens + width)
    new = max(1, min(max_tokens, context) - width) if not new_only else min(max_tokens, context - width)
    if hasattr(model, "generate_rows"):
        generated_rows = model.generate_rows(prompts, new, greedy, pad)  # (batch, new)
    else:
        generated_rows = _torch_rows(model, prompts, new, greedy, pad, new_only)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None and new_only else set()
    results = []
    for prompt, generated in zip(prompts, generated_rows):
        generated = list(generated)
        for k, token in enumerate(generated):
            if token in eos:
                generated = generated[: k + 1]
                break
        results.append(np.asarray(generated if new_only else [*prompt, *generated], dtype=np.int64))
    return results


def _torch_rows(model: PreTrainedModel, prompts: Sequence[Sequence[int]], new: int, greedy: bool, pad: int,
                new_only: bool) -> list[list[int]]:
    """Each prompt's continuation by transformers' generate (sampling: InverseCdfSampling)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampling = LogitsProcessorList([] if greedy else [InverseCdfSampling(SAMPLING_TEMPERATURE)])
    stops = {} if new_only else {"eos_token_id": []}  # [] : no token stops the batch
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                             pad_token_id=pad, do_sample=False, logits_processor=sampling,
                             **stops).cpu()
    return out[:, width:].tolist()


def inverse_cdf_draw(logits: np.ndarray, temperature: float) -> np.ndarray:
    """One token per row of ``logits`` (rows, vocab), drawn at ``temperature`` by inverse CDF from one uniform
    number per row of torch's global generator: InverseCdfSampling's draw, in numpy."""
    scaled = logits.astype(np.float64) / temperature
    cdf = np.cumsum(np.exp(scaled - scaled.max(axis=-1, keepdims=True)), axis=-1)  # (rows, vocab), unnormalised
    draw = torch.rand(logits.shape[0], dtype=torch.float64).numpy() * cdf[:, -1]
    chosen = np.sum(cdf < draw[:, None], axis=-1)  # per row: searchsorted(cdf, draw), as torch.searchsorted
    return np.minimum(chosen, logits.shape[-1] - 1).astype(np.int64)


class InverseCdfSampling(LogitsProcessor):
    """Sampling at ``temperature`` inside greedy generation: each row draws its token by inverse CDF (one uniform
    number per row, torch's global generator) and only that token keeps a finite score, so the greedy step picks
    it. The same distribution as generate's own sampling, whose torch.multinomial took 38% of the writing time on
    2 CPU cores (123 ms per 128 x 49k step against 27 ms here)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (batch, vocab)
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        draw = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        chosen = torch.searchsorted(cdf, draw).clamp_max(scores.shape[-1] - 1)  # (batch, 1)
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(-1, chosen, 0.0)


def corpus_texts(tokenizer: PreTrainedTokenizerBase, files: Sequence[Path]) -> list[np.ndarray]:
    """The user's files, tokenized and cut into windows of MAX_TEXT_TOKENS."""
    texts = []
    for path in files:
        ids = tokenizer(Path(path).read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        texts += [np.asarray(ids[i:i + MAX_TEXT_TOKENS], dtype=np.int64)
                  for i in range(0, len(ids), MAX_TEXT_TOKENS) if len(ids[i:i + MAX_TEXT_TOKENS]) > 1]
    return texts


# -- the teacher-forced pass ----------------------------------------------------------------------------------
def distill(model: PreTrainedModel, texts: Sequence[np.ndarray], feature_layers: Sequence[int],
            progress: Progress = no_progress, bar: ProgressBar | None = None) -> DistillationSet:
    """One batched forward pass over every text: the feature layers' inputs and the top-K next-token
    probabilities at every position. ``bar``: report to this one (a shard of a larger pass) instead of a new one."""
    texts = [t for t in texts if t.size > 1]
    offsets = np.concatenate([[0], np.cumsum([t.size for t in texts])]).astype(np.int64)
    total = int(offsets[-1])
    hidden = model.config.hidden_size
    features = np.empty((total, len(feature_layers) * hidden), np.float16)
    top_ids = np.empty((total, TOP_K), np.int32)
    top_probs = np.empty((total, TOP_K), np.float16)
    own = bar is None
    bar = progress(LABELS_BAR, total) if own else bar
    order = np.argsort([t.size for t in texts])  # similar lengths together: little padding
    try:
        for start in range(0, len(texts), FORWARD_BATCH):
            batch = [int(i) for i in order[start:start + FORWARD_BATCH]]
            width = max(texts[i].size for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : texts[i].size] = torch.from_numpy(texts[i])
                mask[row, : texts[i].size] = 1
            with torch.no_grad():
                out = model(ids.to(model.device), attention_mask=mask.to(model.device), output_hidden_states=True,
                            use_cache=False)
                feats = torch.cat([out.hidden_states[k] for k in feature_layers], dim=-1)  # (batch, width, F)
                feats = feats.float().cpu()
                probs, idx = (t.cpu() for t in torch.softmax(out.logits.float(), dim=-1).topk(TOP_K, dim=-1))
            for row, i in enumerate(batch):
                n, at = texts[i].size, int(offsets[i])
                features[at:at + n] = feats[row, :n].numpy()
                top_ids[at:at + n] = idx[row, :n].numpy()
                top_probs[at:at + n] = probs[row, :n].numpy()
                bar.update(n)
    finally:
        if own:
            bar.close()
    return DistillationSet(list(texts), features, top_ids, top_probs, offsets)


def draft_vocabulary(data: DistillationSet, size: int, target_vocab: int) -> np.ndarray:
    """The ``size`` tokens the target most often predicts (its argmax) or writes in this data, most frequent first:
    the draft's reduced vocabulary (draft id -> target id)."""
    counts = np.bincount(data.top_ids[:, 0], minlength=target_vocab).astype(np.float64)
    for text in data.tokens:
        counts += np.bincount(text, minlength=target_vocab) * 0.5
    size = min(size, target_vocab)
    order = np.argsort(-counts, kind="stable")[:size]
    return order.astype(np.int64)

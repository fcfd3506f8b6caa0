"""The public API: load a bundle once, generate many times.

    from specx.runtime import GenerationConfig, Generator
    gen = Generator.load("~/.cache/specx/gpt2-large", provider="auto")
    result = gen.generate("def fib(n):", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_second)
    config = GenerationConfig(max_new_tokens=32, temperature=0.7, seed=1)
    for piece in gen.stream("Once upon a time", config):
        print(piece, end="", flush=True)

Options travel as one GenerationConfig (specx.runtime.config); keyword arguments of generate() and stream() override
its fields for one call (``tree_budget=8``), and fields it leaves unset are the bundle's to choose
(specx.runtime.defaults: its tuning, else the measured defaults; ``default_config`` shows the result).

One Generator may be shared by threads: its generations run one at a time (a thread's generation waits until the
running one ends: its stream read to the end, closed, or dropped). Within one thread, starting a generation while a
stream of the same Generator is still open supersedes that stream: reading it again raises StreamInterruptedError
(``specx.runtime.ownership``). For generations that really run side by side, load one Generator each.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers.decoders import DecodeStream

from specx.errors import BundleError, CapacityError, InvalidArgumentError, ProviderError
from specx.runtime.arguments import check_flag, check_int, check_optional_int, check_text, prompt_kind, token_ids
from specx.runtime.bundle import Bundle
from specx.runtime.chat import Messages, render_chat
from specx.runtime.config import DRAFTING_MODES, GenerationConfig, as_config
from specx.runtime.decoding import (DecodeRequest, FeatureDrafter, ModelDrafter, NgramDrafter, StepLog, autoregressive,
                                    speculative)
from specx.runtime.drafting import TokenDraft, TreeShape
from specx.runtime.defaults import DraftKind, resolve, tuned_record
from specx.runtime.feature_draft import FeatureDraft, check_feature_draft
from specx.runtime.ngram import KatzTrigram, SessionNgram
from specx.runtime.manifest import ModelEntry
from specx.runtime.ownership import Claim, SessionGuard
from specx.runtime.sampling import SamplingConfig
from specx.runtime.session import (DecoderSession, Placement, cap_threads, check_graph, cuda_available,
                                   default_session_options, open_session)
from specx.runtime.tree import DRAFT_BUCKETS, TREE_BUCKETS
# The modes, tree defaults and measured thresholds live in specx.runtime.config / .defaults; importable here too.
from specx.runtime.config import DEFAULT_TREE_BUDGET, DEFAULT_TREE_DEPTH, DRAFT_CHOICES, MODES, tree_shape  # noqa: F401
from specx.runtime.defaults import (DRAWN_TREE_THRESHOLD, FEATURE_GREEDY_TREE, FEATURE_GREEDY_TREE_FLOOR,  # noqa: F401
                                    FEATURE_GREEDY_TREE_THRESHOLD, GREEDY_TREE_THRESHOLD, SAMPLING_TREE_THRESHOLD)

TREE_ROWS_SLACK = 64  # rows a reservation adds for the tree passes beyond the tokens themselves
INEXACT_ACCURACY_LEVEL = 1  # MatMulNBits accuracy levels from this one up quantize activations (int8 compute)


@dataclass
class GenerationStats:
    mode: str
    provider: str
    new_tokens: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose cached rows a previous generation left (reuse_cache=True)
    target_calls: int = 0
    draft_calls: int = 0
    seconds: float = 0.0  # wall time of the whole call: prefill + decoding
    tokens_per_second: float = 0.0  # new_tokens / seconds
    prefill_seconds: float = 0.0
    target_seconds: float = 0.0  # inside target runs (prefill included)
    draft_seconds: float = 0.0
    overhead_fraction: float = 0.0  # share of wall time outside model runs and n-gram proposals
    tokens_per_target_call: float = 0.0  # tau
    accepted_histogram: list[int] = field(default_factory=list)  # [k] = target calls that accepted k draft tokens
    weight_bytes_ratio: float = 1.0  # weight bytes read per token relative to plain decoding
    tree_budget: int = 0
    tree_depth: int = 0
    tree_threshold: float = 0.0
    tree_floor: float = 0.0
    nodes_per_verify: float = 0.0  # draft nodes per target verify pass (the tree after the floor)
    draft2_proposed: int = 0  # tokens the n-gram model proposed
    draft2_accepted: int = 0  # of those, tokens the draft (staged) or the target (ngram mode) kept
    draft_calls_saved: int = 0  # draft calls below depth-per-step: stage-2 chains, adaptive depth, a full budget
    draft2_seconds: float = 0.0  # time spent in n-gram proposals
    draft_choice: str = ""  # "sample" (children drawn from the draft) or "top" (its top tokens); "" without a draft

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # new token ids (an EOS that stopped generation included)
    text: str  # decoded new tokens, special tokens skipped
    stats: GenerationStats
    config: GenerationConfig | None = None  # what the generation ran with, every field resolved


@dataclass
class TextStream:
    """Iterate for text pieces as they are decided; ``result`` is set once the iteration ends. A stream holds its
    Generator from its first piece to its end: ``close()`` one you stop reading early (or use ``with``)."""

    _pieces: Iterator[str]
    result: GenerationResult | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        """Stop the generation and free the Generator for the next one."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Generator:
    def __init__(self, bundle: Bundle, target: DecoderSession, draft: DecoderSession | None,
                 ngram: KatzTrigram | None, max_context: int | None = None):
        self.bundle = bundle
        self.target = target
        self.draft = draft
        self.ngram = ngram
        context = self.model_context
        max_context = check_optional_int("max_context", max_context)
        if max_context is not None and not 1 <= max_context <= context:
            raise InvalidArgumentError(f"max_context must lie in [1, {context}] (the model's context), got {max_context}")
        self.max_context = max_context or context
        self.vocab_map: np.ndarray | None = None  # a feature draft's: draft id -> target id
        self.tree_buckets: tuple[int, ...] = ()  # verify passes padded to these sizes (load(pad_trees=True))
        self._guard = SessionGuard()  # one generation at a time drives the sessions

    @classmethod
    def load(cls, bundle_dir: str | Path, provider: str = "auto", max_context: int | None = None,
             threads: int | None = None, pad_trees: bool = False, cuda_graphs: bool = False) -> "Generator":
        """``max_context`` caps prompt + new tokens below the model's context, which also bounds KV memory;
        ``threads``: ONNX Runtime intra-op threads (default: its own choice, the physical cores; more than the
        machine's cores is lowered to them, with a warning). ``pad_trees``: verify passes padded to
        ``TREE_BUCKETS`` (a few fixed shapes). ``cuda_graphs``: padded passes on device buffers bound once, captured
        as CUDA graphs on CUDA (static-shape bundles: --dtype fp16, fp16-int8, fp16-int4); on the CPU the same
        fixed-buffer passes run without capture."""
        threads, lowered = cap_threads(check_optional_int("threads", threads, minimum=1))
        if lowered:
            warnings.warn(lowered, RuntimeWarning, stacklevel=2)
        bundle = Bundle.load(bundle_dir)
        manifest = bundle.manifest
        if cuda_graphs and not manifest.target.contract.static_shapes:
            raise InvalidArgumentError(f"cuda_graphs needs a static-shape bundle; {bundle.path.name} is "
                                       f"{manifest.dtype}: export with --dtype fp16, fp16-int8 or fp16-int4")
        target = _decoder(bundle, manifest.target, provider, threads, fixed_buckets=TREE_BUCKETS if cuda_graphs else (),
                          cuda_graphs=cuda_graphs)
        # The draft's threads do not spin when idle: spinning, they held the cores through the target's verify pass
        # (a 6-token verify took 52 ms instead of 33; with the target's spinning kept, plain decoding stays as fast).
        # With CUDA graphs the draft's passes (launch-bound: where capture matters most) are padded to DRAFT_BUCKETS
        # and replayed, a feature draft's with its features or hidden states padded alike.
        draft_graphs = cuda_graphs and manifest.draft is not None and manifest.draft.contract.static_shapes
        draft = _decoder(bundle, manifest.draft, target.placement.name, threads, spinning=False,
                         fixed_buckets=DRAFT_BUCKETS if draft_graphs else (), cuda_graphs=draft_graphs,
                         pad_to_buckets=draft_graphs) if manifest.draft else None
        ngram = KatzTrigram.load(bundle.path / manifest.ngram.file, manifest.target.contract.vocab_size) \
            if manifest.ngram else None
        generator = cls(bundle, target, draft, ngram, max_context)
        generator.tree_buckets = TREE_BUCKETS if pad_trees or cuda_graphs else ()
        if draft is not None and manifest.draft.is_feature_draft:
            generator.vocab_map = _vocab_map(bundle, manifest.draft)
            check_feature_draft(target, draft, generator.vocab_map)
        return generator

    @property
    def provider(self) -> str:
        return self.target.placement.name

    @property
    def model_context(self) -> int:
        entries = filter(None, (self.bundle.manifest.target, self.bundle.manifest.draft))
        return min(e.architecture.max_positions for e in entries)

    @property
    def max_positions(self) -> int:
        """Prompt + new tokens a generation may hold: the model's context or the ``max_context`` cap."""
        return self.max_context

    # -- public API --------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int] | Messages, config: GenerationConfig | None = None, *,
                 chat: bool = False, reuse_cache: bool = False, **overrides: Any) -> GenerationResult:
        """Generate to the end: ``config`` (None: GenerationConfig()'s defaults) with ``overrides`` by the flat names
        of specx.runtime.config.OVERRIDES (max_new_tokens=64, temperature=0.7, tree_budget=8, ...). See stream()."""
        stream = self.stream(prompt, config, chat=chat, reuse_cache=reuse_cache, **overrides)
        for _ in stream:
            pass
        assert stream.result is not None  # set when the iteration ends
        return stream.result

    def stream(self, prompt: str | Sequence[int] | Messages, config: GenerationConfig | None = None, *,
               chat: bool = False, reuse_cache: bool = False, **overrides: Any) -> TextStream:
        """Validate everything up front, then return a stream of text pieces (nothing runs until iterated).

        ``config`` and ``overrides`` as in generate(); an unknown keyword is an InvalidArgumentError naming it.
        ``chat=True`` (or a list of {"role", "content"} messages as the prompt) formats the prompt with the bundle's
        chat template, as transformers' apply_chat_template(add_generation_prompt=True) does. ``reuse_cache=True``
        keeps the cached rows of the previous generation that the new prompt starts with (a conversation's earlier
        turns) instead of computing them again."""
        config = self.default_config(config, **overrides)
        chat, reuse_cache = check_flag("chat", chat), check_flag("reuse_cache", reuse_cache)
        if chat or prompt_kind(prompt) == "messages":
            prompt = self.chat_prompt_ids(prompt)
        request = self._request(prompt, config.max_new_tokens, config.sampling, config.ignore_eos)
        stream = TextStream(iter(()))
        stream._pieces = self._run(config, request, stream, reuse_cache)
        return stream

    def default_config(self, config: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """The config a generation with these settings runs with: the fields given, the rest (mode, tree, draft
        choice) from the bundle's tuning for its temperature (`specx bench --tune`), else the measured defaults.
        ``gen.default_config(temperature=0.7)`` shows the bundle's sampling defaults; passed back to generate(), a
        resolved config runs the same (resolve it at the temperature it will run at: the tree depends on it)."""
        asked = as_config(config, overrides)
        self._check_tree_fits(asked.tree.budget, asked.tree.depth)
        return resolve(asked, self.draft_kind, self.tuned(sampling=asked.temperature > 0))

    @property
    def draft_kind(self) -> DraftKind:
        target = self.bundle.manifest.target
        return DraftKind(model=self.draft is not None, trained=self.vocab_map is not None,
                         exact_trees=exact_trees(target), exact_chains=exact_chains(target))

    def _check_tree_fits(self, budget: int | None, depth: int | None) -> None:
        """Refuse, before anything is allocated, a tree that no verify pass could hold (it asked for 119 GiB at a
        budget of 10^9)."""
        for name, value in (("tree budget", budget), ("tree depth", depth)):
            if value is not None and value >= self.max_positions:
                raise CapacityError(f"a {name} of {value} cannot fit a context of {self.max_positions} positions "
                                    f"(the verify pass holds the tree and its root); use at most "
                                    f"{self.max_positions - 1}")

    def tuned(self, sampling: bool) -> dict:
        """The defaults `specx bench --tune` measured fastest on this machine (mode, tree), if any."""
        return tuned_record(self.bundle.manifest.tuning, sampling)

    def chat_prompt_ids(self, conversation: str | Messages) -> list[int]:
        """Token ids of a conversation (a user message as a string, or messages) under the bundle's chat template."""
        template = self.bundle.manifest.tokenizer.chat_template
        if template is None:
            raise InvalidArgumentError(f"bundle {self.bundle.path.name} has no chat template; drop --chat / chat=True "
                                       "and pass the prompt as plain text")
        kind = prompt_kind(conversation)
        if kind == "ids":
            raise InvalidArgumentError("a chat prompt is a user message (str) or a list of {'role', 'content'} "
                                       "messages, not token ids; drop chat=True to pass token ids")
        messages = [{"role": "user", "content": conversation}] if kind == "text" else conversation
        text = check_text("the chat prompt", render_chat(template, messages,
                                                         self.bundle.manifest.tokenizer.special_tokens))
        return self.bundle.tokenizer.encode(text, add_special_tokens=False).ids

    def reserve(self, tokens: int) -> None:
        """Allocate the caches for ``tokens`` positions (prompt + output) now, e.g. for a conversation whose turns
        should all reuse the cache (a cache that has to grow later is reallocated, dropping what it held)."""
        tokens = check_int("tokens", tokens)
        if not 1 <= tokens <= self.max_positions:
            raise CapacityError(f"cannot reserve {tokens} positions: the limit is {self.max_positions}")
        claim = self._guard.claim()  # a stream this thread left open is superseded: its caches are reset here
        try:
            for session in filter(None, (self.target, self.draft)):
                session.reset()
                session.reserve(min(tokens + TREE_ROWS_SLACK, self.max_positions))
        finally:
            self._guard.release(claim)

    # -- internals ---------------------------------------------------------------------------------------------
    def _request(self, prompt: str | Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
                 ignore_eos: bool) -> DecodeRequest:
        if prompt_kind(prompt) == "text":
            if not prompt.strip():
                raise InvalidArgumentError("the prompt is empty; pass some text")
            ids = tuple(self.bundle.tokenizer.encode(check_text("the prompt", prompt)).ids)
        else:
            ids = token_ids(prompt, self.target.contract.vocab_size)
        if not ids:
            raise InvalidArgumentError("the prompt is empty; pass some text")
        if len(ids) + max_new_tokens > self.max_positions:
            cap = "the model's context" if self.max_context == self.model_context else "--max-context"
            raise CapacityError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds {cap} of "
                f"{self.max_positions} tokens; shorten the prompt or lower max_new_tokens"
            )
        stop = frozenset() if ignore_eos else frozenset(self.bundle.manifest.tokenizer.eos_token_ids)
        return DecodeRequest(ids, max_new_tokens, sampling, stop, self.max_positions, self.tree_buckets)

    def _run(self, config: GenerationConfig, request: DecodeRequest, stream: TextStream,
             reuse_cache: bool = False) -> Iterator[str]:
        """The generation, holding the sessions from its first piece to its end (``specx.runtime.ownership``)."""
        claim = self._guard.claim()
        try:
            yield from self._decode(claim, config, request, stream, reuse_cache)
        finally:
            self._guard.release(claim)

    def _decode(self, claim: Claim, config: GenerationConfig, request: DecodeRequest, stream: TextStream,
                reuse_cache: bool) -> Iterator[str]:
        """``config``: resolved (default_config), so its mode and tree are set."""
        mode, shape, draw_children = config.mode, config.tree.shape(), config.draws_children
        rng = np.random.default_rng(request.sampling.seed)
        sessions = [s for s in (self.target, self.draft) if s is not None]
        for session in sessions:
            if not reuse_cache:
                session.reset()
            session.reset_counters()
        self._reserve(mode, request, shape)
        reused = self.target.reuse(request.prompt_ids[:-1])  # the loops keep the same prefix
        log = StepLog()
        session_ngram = SessionNgram(self.ngram) if mode in ("staged", "ngram") else None
        if mode == "autoregressive":
            tokens_iter = autoregressive(self.target, request, rng)
        elif mode == "ngram":
            tokens_iter = speculative(self.target, NgramDrafter(session_ngram, log), request, shape, rng, log)
        else:
            drafter = self._drafter(session_ngram, log, request.max_positions)
            tokens_iter = speculative(self.target, drafter, request, shape, rng, log, draw_children)
        decoder = DecodeStream(skip_special_tokens=True)
        tokens: list[int] = []
        start = time.perf_counter()
        first_token_at = None
        for token in tokens_iter:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            tokens.append(token)
            piece = decoder.step(self.bundle.tokenizer, token)
            if piece:
                yield piece
                claim.check()  # this thread started another generation meanwhile: the caches are no longer ours
        seconds = time.perf_counter() - start
        stats = self._stats(mode, request, tokens, seconds, (first_token_at or start) - start, log, shape,
                            session_ngram.seconds if session_ngram else 0.0)
        stats.reused_prompt_tokens = reused
        stats.draft_choice = "sample" if draw_children else ("top" if mode in DRAFTING_MODES else "")
        text = self.bundle.tokenizer.decode(tokens, skip_special_tokens=True)
        stream.result = GenerationResult(tokens=tokens, text=text, stats=stats, config=config)

    def _drafter(self, ngram: SessionNgram | None, log: StepLog, max_rows: int) -> ModelDrafter:
        if self.vocab_map is not None:
            return FeatureDrafter(FeatureDraft(self.draft, self.vocab_map), ngram, log, max_rows)
        return ModelDrafter(TokenDraft(self.draft), ngram, log, max_rows)

    def _reserve(self, mode: str, request: DecodeRequest, shape: TreeShape) -> None:
        """Allocate the caches once, before any pass: committed tokens plus the largest pass's extra rows (a tree
        verification for the target; every node and stage-2 chain token of one step's draft calls for the draft),
        never more than the context: trees shrink near its end to what it holds."""
        tokens = len(request.prompt_ids) + request.max_new_tokens
        tree_rows = shape.budget + 1 if mode != "autoregressive" else 0
        needs = [(self.target, tokens + tree_rows)]
        if self.draft is not None and mode in ("speculative", "staged"):
            needs.append((self.draft, tokens + shape.depth * shape.width * (shape.depth + 1) + 1))
        for session, wanted in needs:
            rows = min(wanted, request.max_positions)
            if rows > session.capacity:
                session.reset()  # a larger cache is a new allocation: nothing to reuse
            session.reserve(rows)

    def _stats(self, mode: str, request: DecodeRequest, tokens: list[int], seconds: float, prefill_seconds: float,
               log: StepLog, shape: TreeShape, draft2_seconds: float) -> GenerationStats:
        manifest = self.bundle.manifest
        uses_draft = self.draft is not None and mode in ("speculative", "staged")
        draft_calls = self.draft.calls if uses_draft else 0
        draft_seconds = self.draft.seconds if uses_draft else 0.0
        target_calls = self.target.calls
        new = len(tokens)
        verify_calls = len(log.accepted) if mode != "autoregressive" else target_calls  # calls that produced tokens
        tree_mode = mode != "autoregressive"
        target_bytes = manifest.target.weight_bytes
        draft_bytes = manifest.draft.weight_bytes if manifest.draft else 0
        histogram = np.bincount(log.accepted, minlength=1).tolist() if log.accepted else []
        model_seconds = self.target.seconds + draft_seconds + draft2_seconds
        return GenerationStats(
            mode=mode,
            provider=self.provider,
            new_tokens=new,
            prompt_tokens=len(request.prompt_ids),
            target_calls=target_calls,
            draft_calls=draft_calls,
            seconds=seconds,
            tokens_per_second=new / seconds if seconds > 0 else 0.0,
            prefill_seconds=prefill_seconds,
            target_seconds=self.target.seconds,
            draft_seconds=draft_seconds,
            overhead_fraction=max(0.0, 1.0 - model_seconds / seconds) if seconds > 0 else 0.0,
            tokens_per_target_call=new / verify_calls if verify_calls else 0.0,
            accepted_histogram=histogram,
            weight_bytes_ratio=(target_calls * target_bytes + draft_calls * draft_bytes) / (new * target_bytes)
            if new else 0.0,
            tree_budget=shape.budget if tree_mode else 0,
            tree_depth=shape.depth if tree_mode else 0,
            tree_threshold=shape.threshold if tree_mode else 0.0,
            tree_floor=shape.floor if tree_mode else 0.0,
            nodes_per_verify=sum(log.verified) / len(log.verified) if log.verified else 0.0,
            draft2_proposed=log.stage_two.proposed,
            draft2_accepted=log.stage_two.accepted,
            draft_calls_saved=max(0, log.planned_draft_calls - draft_calls) if uses_draft else 0,
            draft2_seconds=draft2_seconds,
        )


def _vocab_map(bundle: Bundle, entry: ModelEntry) -> np.ndarray:
    if entry.vocab_map is None:
        raise BundleError(f"{bundle.path}: the feature draft has no vocabulary map; retrain it with `specx train-draft`")
    path = bundle.path / entry.vocab_map
    try:
        return np.load(path, allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the draft's vocabulary map {path} ({exc}); retrain it with "
                          "`specx train-draft`") from exc


def exact_trees(target: ModelEntry) -> bool:
    """Whether the target's tree passes give each node what one-token steps give it: measured at export
    (parity row_consistent). Bundles from before the measurement: float graphs are (fp32 measured ~2e-5 apart),
    graphs quantized at accuracy_level 4 are not assumed to be (they measured 0.4-0.9 apart on SmolLM2)."""
    recorded = target.parity.get("row_consistent")
    if recorded is not None:
        return bool(recorded)
    return not (target.quantization and target.quantization.get("accuracy_level", 0) >= INEXACT_ACCURACY_LEVEL)


def exact_chains(target: ModelEntry) -> bool:
    """Whether the target's chain passes give each row what one-token steps give it (parity chains_exact: targets
    whose passes are padded); bundles from before the measurement: as their trees."""
    recorded = target.parity.get("chains_exact")
    return exact_trees(target) if recorded is None else bool(recorded)


def _open_graph(bundle: Bundle, entry: ModelEntry, provider: str, options: ort.SessionOptions,
                cuda_graphs: bool) -> tuple[ort.InferenceSession, Placement]:
    """open_session for ``entry``'s graph; a bf16 graph (no CPU kernels) on CUDA, or a ProviderError saying why
    instead of ONNX Runtime's missing-kernel error."""
    path = bundle.graph_path(entry)
    if entry.contract.kv_dtype != "bfloat16":
        return open_session(path, provider, options, cuda_graphs=cuda_graphs)
    why = (f"{bundle.path.name} is bf16, which runs on CUDA only (ONNX Runtime's CPU kernels take no bfloat16 for "
           "its attention and matmuls)")
    if not cuda_available(provider):
        raise ProviderError(f"{why}, and provider {provider!r} gives no CUDA device: run it on a GPU with "
                            "onnxruntime-gpu, or export --dtype fp32 / int4 for the CPU")
    try:
        return open_session(path, provider, options, cuda_graphs=cuda_graphs)  # on the CPU its kernels are missing
    except ProviderError as exc:
        raise ProviderError(f"{why}, and CUDA did not load here: {exc}") from exc


def _decoder(bundle: Bundle, entry: ModelEntry, provider: str, threads: int | None = None,
             spinning: bool = True, fixed_buckets: tuple[int, ...] = (), cuda_graphs: bool = False,
             pad_to_buckets: bool = False) -> DecoderSession:
    """``fixed_buckets``: pass lengths run on buffers bound once, captured as CUDA graphs where ``cuda_graphs`` and
    the session runs on CUDA; ``pad_to_buckets``: shorter passes padded to them (a draft's)."""
    session, placement = _open_graph(bundle, entry, provider, default_session_options(threads, spinning), cuda_graphs)
    committer, _ = open_session(bundle.commit_path(entry), placement.name)
    check_graph(session, entry.contract, entry.graph)
    check_graph(committer, entry.contract.kv_commit(), entry.kv_commit)
    return DecoderSession(session, committer, entry.contract, placement, fixed_buckets=fixed_buckets,
                          capture=cuda_graphs and placement.name == "cuda", pad_to_buckets=pad_to_buckets,
                          max_capacity=entry.architecture.max_positions)

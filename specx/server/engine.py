"""One model, one generation at a time: a worker thread owns the Generator and runs admitted requests in order.

A request is checked and tokenized where it arrives (``Engine.prepare``: a prompt too long for the context is a 400
before it queues), then admitted (``Engine.submit``: a 429 when ``max_queue`` requests already wait behind the running
one) and queued. The worker iterates each request's stream alone, so a request's tokens are the ones it would get
with the model to itself, and hands the text pieces back through the request's ``deliver`` callback (the server's
event loop). A cancelled request (its client went away) stops at the next piece and frees the model.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Union

from specx.errors import CapacityError, InvalidArgumentError, SpecxError
from specx.runtime.config import GenerationConfig
from specx.runtime.generator import Generator, TextStream
from specx.server.protocol import ApiError, CompletionRequest, Usage, bad_request

DEFAULT_MAX_QUEUE = 8  # requests that may wait behind the running one
DEFAULT_MAX_TOKENS = 512  # new tokens when a request sets no max_tokens (fewer where the context ends sooner)
CLOSE_TIMEOUT_SECONDS = 5.0  # how long closing waits for the running generation to stop
PROBE_PROMPT = "probe"  # checks the server's mode against the bundle at start (validated, never run)

log = logging.getLogger("specx.server")


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length" (max_tokens reached)
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Union[Piece, Finished, Failed]


class StopText:
    """Text pieces with the stop sequences cut off: ``feed`` returns what is safe to send (never the start of what
    may still become a stop sequence); ``stopped`` once one appeared; ``flush`` gives back what was held."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[:min(found)]
        keep = max((_overlap(text, stop) for stop in self.stops), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that begins ``stop`` (shorter than it)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready to run: its stream validated (nothing run yet), its prompt counted."""

    stream: TextStream
    prompt_tokens: int
    max_tokens: int
    stops: tuple[str, ...]


class Job:
    """An admitted request. ``deliver`` takes its events to the waiting handler; ``cancel`` stops it."""

    def __init__(self, prepared: Prepared, deliver: Callable[[Event], None]):
        self.prepared = prepared
        self._deliver = deliver
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self._deliver(event)
        except RuntimeError:  # the server's event loop is closed: nobody is listening any more
            self.cancel()


class Engine:
    """The queue in front of one Generator, and the worker thread that owns it."""

    def __init__(self, generator: Generator, mode: str = "auto", max_queue: int = DEFAULT_MAX_QUEUE,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        if max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be >= 0, got {max_queue}")
        self.generator = generator
        self.mode = mode
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0  # the running request and those waiting
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        generator.stream(PROBE_PROMPT, GenerationConfig(max_new_tokens=1, mode=mode)).close()  # a mode it lacks fails

    # -- where requests arrive ---------------------------------------------------------------------------------
    def prepare(self, request: CompletionRequest) -> Prepared:
        """Count the prompt, fit max_tokens to the context, and validate everything (no model run: safe while the
        worker generates). Raises ApiError (400)."""
        param = "messages" if request.chat else "prompt"
        prompt = list(request.prompt) if request.chat else request.prompt
        prompt_tokens = self._prompt_tokens(request.chat, prompt)
        max_tokens = self._max_tokens(request, prompt_tokens, param)
        s = request.sampling
        try:
            config = GenerationConfig(max_new_tokens=max_tokens, temperature=s.temperature, top_k=s.top_k,
                                      top_p=s.top_p, seed=s.seed, mode=self.mode)
            stream = self.generator.stream(prompt, config)
        except CapacityError as exc:
            raise bad_request(str(exc), param=param, code="context_length_exceeded") from exc
        except InvalidArgumentError as exc:
            raise bad_request(str(exc)) from exc
        return Prepared(stream, prompt_tokens, max_tokens, s.stop)

    def _prompt_tokens(self, chat: bool, prompt) -> int:  # noqa: ANN001  (messages, text or token ids)
        try:
            if chat:
                return len(self.generator.chat_prompt_ids(prompt))
            if isinstance(prompt, str):
                return len(self.generator.bundle.tokenizer.encode(prompt).ids)
        except InvalidArgumentError as exc:  # no chat template, a template that fails on these messages
            raise bad_request(str(exc), param="messages" if chat else "prompt") from exc
        return len(prompt)

    def _max_tokens(self, request: CompletionRequest, prompt_tokens: int, param: str) -> int:
        context = self.generator.max_positions
        room = context - prompt_tokens
        asked = request.sampling.max_tokens
        if room < 1 or (asked is not None and asked > room):
            wanted = f" + max_tokens ({asked})" if asked is not None else " and at least one new token"
            raise bad_request(f"this model's context is {context} tokens; the {param} takes {prompt_tokens} tokens"
                              f"{wanted} would exceed it: shorten the {param}"
                              f"{' or lower max_tokens' if asked is not None else ''}",
                              param=param, code="context_length_exceeded")
        return asked if asked is not None else min(self.default_max_tokens, room)

    def submit(self, prepared: Prepared, deliver: Callable[[Event], None]) -> Job:
        """Queue a prepared request, or refuse it (ApiError 429) when ``max_queue`` already wait."""
        with self._lock:
            if self._admitted > self.max_queue:
                raise ApiError(429, f"the server is busy: one request is running and {self._admitted - 1} are "
                                    f"waiting (--max-queue {self.max_queue}); retry later",
                               code="queue_full", kind="rate_limit_exceeded")
            self._admitted += 1
        job = Job(prepared, deliver)
        self._jobs.put(job)
        return job

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._lock:
            admitted = self._admitted
        return min(admitted, 1), max(admitted - 1, 0)

    # -- the worker --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="specx-serve-worker", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the worker after the running generation; requests still waiting get a 503."""
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(CLOSE_TIMEOUT_SECONDS)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001  (the worker outlives any one request's failure)
                log.exception("generation failed")
                job.emit(Failed(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")))
            finally:
                job.prepared.stream.close()
                with self._lock:
                    self._admitted -= 1
        self._refuse_waiting()

    def _refuse_waiting(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Failed(ApiError(503, "the server is shutting down", kind="server_error")))

    def _run(self, job: Job) -> None:
        prepared = job.prepared
        if job.cancelled.is_set():  # its client left while it waited
            return
        stops = StopText(prepared.stops)
        raw: list[str] = []
        try:
            for piece in prepared.stream:
                raw.append(piece)
                self._send(job, stops.feed(piece))
                if stops.stopped or job.cancelled.is_set():
                    break
        except SpecxError as exc:
            job.emit(Failed(ApiError(500, f"generation failed: {exc}", kind="server_error")))
            return
        if job.cancelled.is_set():
            return
        result = prepared.stream.result
        if result is not None and not stops.stopped:
            sent = "".join(raw)
            if result.text.startswith(sent):  # bytes the piecewise decoder still held at the end
                self._send(job, stops.feed(result.text[len(sent):]))
            if not stops.stopped:
                self._send(job, stops.flush())
        job.emit(Finished(self._finish_reason(prepared, result, stops.stopped),
                          self._usage(prepared, result, "".join(raw))))

    @staticmethod
    def _send(job: Job, text: str) -> None:
        if text:
            job.emit(Piece(text))

    def _finish_reason(self, prepared: Prepared, result, stopped: bool) -> str:  # noqa: ANN001
        if stopped or result is None or not result.tokens:
            return "stop"
        if result.tokens[-1] in self.generator.bundle.manifest.tokenizer.eos_token_ids:
            return "stop"
        return "length" if len(result.tokens) >= prepared.max_tokens else "stop"

    def _usage(self, prepared: Prepared, result, text: str) -> Usage:  # noqa: ANN001
        if result is not None:
            return Usage(result.stats.prompt_tokens, result.stats.new_tokens)
        # cut by a stop sequence: the stream ended before its token count; the text generated, re-encoded, is close
        completion = len(self.generator.bundle.tokenizer.encode(text, add_special_tokens=False).ids)
        return Usage(prepared.prompt_tokens, completion)

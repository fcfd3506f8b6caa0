"""The HTTP side of `specx serve`: a Starlette app on uvicorn in front of the Engine.

Routes: POST /v1/chat/completions and /v1/completions (``stream: true`` answers with server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``), GET /v1/models and /health. Every error is OpenAI's error JSON. A
streaming client that disconnects cancels its request (the worker stops at the next piece); a waiting one is
noticed by the keep-alive comments sent while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from specx.runtime.generator import Generator
from specx.server.engine import DEFAULT_MAX_QUEUE, Engine, Event, Failed, Finished, Job, Piece
from specx.server.protocol import (SSE_DONE, SSE_KEEPALIVE, ApiError, CompletionRequest, Reply, parse_chat,
                                   parse_completion, parse_json, sse)

DEFAULT_HOST = "127.0.0.1"  # this machine only: the server has no authentication
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is read whole
KEEPALIVE_SECONDS = 5.0  # a streaming request waiting for the model gets a comment this often
log = logging.getLogger("specx.server")


@dataclass(frozen=True)
class ServeOptions:
    model: str  # a bundle directory or a name under $SPECX_HOME
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    mode: str = "auto"
    max_queue: int = DEFAULT_MAX_QUEUE
    provider: str = "auto"
    threads: Optional[int] = None
    max_context: Optional[int] = None


def serve(options: ServeOptions) -> None:
    """Load the bundle and serve it until interrupted."""
    import uvicorn

    from specx.runtime.bundle import resolve_bundle_dir

    generator = Generator.load(resolve_bundle_dir(options.model), provider=options.provider,
                               max_context=options.max_context, threads=options.threads)
    app = create_app(generator, mode=options.mode, max_queue=options.max_queue)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")


def create_app(generator: Generator, mode: str = "auto", max_queue: int = DEFAULT_MAX_QUEUE,
               model_name: str | None = None) -> Starlette:
    """The ASGI app serving ``generator`` (one request at a time, ``max_queue`` more waiting)."""
    api = Api(Engine(generator, mode, max_queue), model_name or Path(generator.bundle.path).name)
    routes = [Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"])]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=api.lifespan)


class Api:
    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.engine.close)

    async def health(self, request: Request) -> Response:
        running, waiting = self.engine.load
        return JSONResponse({"status": "ok", "model": self.model_name, "running": running, "waiting": waiting,
                             "max_queue": self.engine.max_queue})

    async def models(self, request: Request) -> Response:
        manifest = self.engine.generator.bundle.manifest
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "specx",
                "source": manifest.target.source, "context_length": self.engine.generator.max_positions}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, parse_completion)

    async def _complete(self, request: Request, parse: Callable[[dict[str, Any]], CompletionRequest]) -> Response:
        parsed = parse(parse_json(await _read_body(request)))
        prepared = await run_in_threadpool(self.engine.prepare, parsed)
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = self.engine.submit(prepared, _deliverer(asyncio.get_running_loop(), events))
        reply = Reply.start(parsed.chat, self.model_name)
        if parsed.stream:
            return EventStreamResponse(_stream(job, events, reply, parsed.include_usage),
                                       media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, events, reply)


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Event], None]:
    """A callback for the worker thread: puts an event on ``events`` in the loop's thread."""

    def deliver(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    return deliver


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES // 2**20} MiB", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _whole(request: Request, job: Job, events: asyncio.Queue, reply: Reply) -> Response:
    """A non-streaming answer; a client that disconnects while waiting cancels the request."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    pieces: list[str] = []
    try:
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return JSONResponse(reply.whole("".join(pieces), event.finish_reason, event.usage))
    finally:
        watcher.cancel()
        job.cancel()  # no-op once finished; otherwise (the handler was cancelled) it frees the model


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _stream(job: Job, events: asyncio.Queue, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: the role (chat), the text pieces, the finish reason, usage if asked for, [DONE]."""
    try:
        if reply.chat:
            yield sse(reply.chunk(first=True))
        while True:
            event = await _next(events)
            if event is None:
                yield SSE_KEEPALIVE  # a closed connection shows here, while the request still waits
            elif isinstance(event, Piece):
                yield sse(reply.chunk(event.text))
            elif isinstance(event, Failed):
                yield sse(event.error.body())
                break
            else:
                yield sse(reply.chunk(finish_reason=event.finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(event.usage))
                break
        yield SSE_DONE
    finally:
        job.cancel()  # a client gone mid-stream frees the model at the worker's next piece


async def _next(events: asyncio.Queue) -> Finished | Piece | Failed | None:
    """The next event, or None after KEEPALIVE_SECONDS without one."""
    try:
        return await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
    except asyncio.TimeoutError:
        return None


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse whose body generator is always closed when the response ends, however it ends (a client
    disconnect ends it on a failed send or a cancellation, which would otherwise leave the generator to the garbage
    collector): closing it cancels the request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    error = ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")
    return JSONResponse(error.body(), status_code=500)

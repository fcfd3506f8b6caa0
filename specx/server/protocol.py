"""The OpenAI API as specx serves it: request bodies checked into frozen requests, and the bodies it answers with.

A field specx does not support is refused with a 400 naming it, never ignored: a client that asks for
``presence_penalty: 0.5`` must not silently get something else. Fields that change nothing are accepted: metadata
(``model``, ``user``), ``stream`` / ``stream_options``, and the OpenAI defaults of fields specx does not implement
(``n: 1``, ``presence_penalty: 0``, ``logprobs: false``, ...). ``top_k`` is accepted as an extension, as vLLM and
llama.cpp's servers accept it. No Starlette here: this module is plain data.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from specx.errors import SpecxError
from specx.runtime.chat import ROLES

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
# Fields that are harmless at these values (OpenAI's defaults; None always is): anything else is refused.
NEUTRAL_CHAT = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0,
                "parallel_tool_calls": True}
NEUTRAL_COMPLETION = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "echo": False,
                      "best_of": 1, "suffix": None}
METADATA_FIELDS = ("model", "user", "stream", "stream_options")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
CHAT_FIELDS = ("messages", "max_completion_tokens", *SAMPLING_FIELDS, *METADATA_FIELDS, *NEUTRAL_CHAT)
COMPLETION_FIELDS = ("prompt", *SAMPLING_FIELDS, *METADATA_FIELDS, *NEUTRAL_COMPLETION)
STREAM_OPTIONS = ("include_usage",)


class ApiError(SpecxError):
    """An answer other than 200, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class Sampling:
    """What the runtime is asked for; ``max_tokens`` None: the server's default, capped to the context left."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompletionRequest:
    """One request: ``chat`` (prompt = messages) or a text completion (prompt = text or token ids)."""

    chat: bool
    prompt: str | tuple[int, ...] | tuple[dict[str, str], ...]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


# -- request bodies ------------------------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object (NaN and Infinity are not JSON, and are refused too)."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_chat(body: Mapping[str, Any]) -> CompletionRequest:
    """A /v1/chat/completions body."""
    _refuse_unknown(body, CHAT_FIELDS, NEUTRAL_CHAT)
    messages = _messages(body.get("messages"))
    stream, usage = _streaming(body)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return CompletionRequest(True, messages, _sampling(body, limit), stream, usage)


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """A /v1/completions body: the prompt as text, or as token ids."""
    _refuse_unknown(body, COMPLETION_FIELDS, NEUTRAL_COMPLETION)
    stream, usage = _streaming(body)
    return CompletionRequest(False, _prompt(body.get("prompt")), _sampling(body, "max_tokens"), stream, usage)


def _refuse_unknown(body: Mapping[str, Any], accepted: tuple[str, ...], neutral: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name not in accepted:
            raise bad_request(f"unsupported field {name!r}: specx serve accepts {', '.join(sorted(set(accepted)))} "
                              "(sampling fields the runtime does not implement are refused, not ignored)",
                              param=name, code="unsupported_parameter")
        if name in neutral and value is not None and not _same(value, neutral[name]):
            raise bad_request(f"unsupported value for field {name!r}: {value!r}; specx serve supports only "
                              f"{neutral[name]!r} (or leaving it out)", param=name, code="unsupported_parameter")


def _same(value: Any, default: Any) -> bool:
    """``value == default`` of the same JSON type (true is not 1, 1.0 is 1)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return value == default


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {'role', 'content'} objects", param="messages")
    return tuple(_message(m, k) for k, m in enumerate(value))


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with 'role' and 'content'", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{param}.role")
    return {"role": role, "content": _content(message.get("content"), f"{param}.content")}


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}[{k}] is not supported: specx serves text models, so content parts "
                                  "must be {'type': 'text', 'text': '...'}", param=f"{param}[{k}]")
            texts.append(_text(part["text"], f"{param}[{k}].text"))
        return "".join(texts)
    raise bad_request(f"{param} must be a string or a list of text parts, got {_type(content)}", param=param)


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return _text(value, "prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return _prompt(value[0])  # a batch of one
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return tuple(value)
    raise bad_request("'prompt' must be a string or a list of token ids (one prompt per request: batches of "
                      "several prompts are not supported)", param="prompt")


def _text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid UTF-8 text (a lone surrogate at character {exc.start})",
                          param=param) from exc
    return text


def _streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    for name, value in options.items():
        if name not in STREAM_OPTIONS:
            raise bad_request(f"unsupported field 'stream_options.{name}': specx serve accepts "
                              f"{', '.join(STREAM_OPTIONS)}", param=f"stream_options.{name}",
                              code="unsupported_parameter")
        if not isinstance(value, bool):
            raise bad_request(f"'stream_options.{name}' must be true or false", param=f"stream_options.{name}")
    return bool(stream), bool(options.get("include_usage"))


def _sampling(body: Mapping[str, Any], limit_field: str) -> Sampling:
    return Sampling(max_tokens=_optional_int(body, limit_field, minimum=1),
                    temperature=_number(body, "temperature", 0.0, lambda t: t >= 0, ">= 0"),
                    top_p=_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
                    top_k=_optional_int(body, "top_k", minimum=0) or 0,
                    seed=_optional_int(body, "seed"),
                    stop=_stop(body.get("stop")))


def _optional_int(body: Mapping[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"{name!r} must be an integer, got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise bad_request(f"{name!r} must be >= {minimum}, got {value}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float, valid, bounds: str) -> float:  # noqa: ANN001
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name!r} must be a number, got {value!r}", param=name)
    if not valid(value):
        raise bad_request(f"{name!r} must be {bounds}, got {value}", param=name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or \
            not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
                          param="stop")
    return tuple(_text(s, "stop") for s in stops)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- response bodies -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Reply:
    """Builds the bodies of one request's answer (ids and timestamp shared by all its chunks)."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def start(cls, chat: bool, model: str) -> "Reply":
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        return {**body, "usage": usage.body()}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """A streamed chunk: text, or the last one with the finish reason (and the assistant role first, in chat)."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """stream_options.include_usage: the chunk after the last, with no choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": usage.body()}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
SSE_KEEPALIVE = b": waiting for the model\n\n"  # a comment: clients skip it; a closed connection shows on sending it

"""Chat prompts: a bundle's chat template rendered as transformers' ``apply_chat_template`` renders it.

The template is Jinja (a model's own, stored in the manifest at export) and runs in Jinja's immutable sandbox with
the same settings and helpers transformers gives templates: trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, ``strftime_now`` and a ``tojson`` that does not HTML-escape. The special tokens (bos_token,
eos_token, ...) are template variables, and the rendered text is tokenized without adding special tokens again.
The sandbox is bounded in work, time and size (``specx.runtime.sandbox``): a template that loops for ever or builds
gigabytes fails with a clear error, as does one that raises inside.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.ext

from specx.errors import InvalidArgumentError
from specx.runtime.sandbox import BoundedSandbox, bounded_render

ROLES = ("system", "user", "assistant", "tool")
Messages = Sequence[Mapping[str, Any]]
# What a template may raise besides TemplateError: Python's own errors from its expressions (1 / 0, a range past
# jinja's limit, 'a' + 1, a too deep macro recursion, an integer too long to print, ...). The template is foreign
# code: each is the template's failure, reported as one line.
TEMPLATE_FAILURES = (jinja2.exceptions.TemplateError, ArithmeticError, AttributeError, LookupError, MemoryError,
                     RecursionError, TypeError, ValueError)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.compile_bounded(template)
    except TEMPLATE_FAILURES as exc:
        raise InvalidArgumentError(f"the bundle's chat template does not parse ({_first_line(exc)}); re-export the "
                                   "bundle") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_messages(messages: Messages) -> list[dict[str, Any]]:
    """A conversation: a non-empty list of {"role", "content"} with known roles."""
    if isinstance(messages, (str, bytes)) or not messages:
        raise InvalidArgumentError("a chat needs a non-empty list of messages like {'role': 'user', 'content': '...'}")
    out = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidArgumentError(f"each chat message needs 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise InvalidArgumentError(f"unknown chat role {message['role']!r}; use one of {', '.join(ROLES)}")
        out.append(dict(message))
    return out


def render_chat(template: str, messages: Messages, special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``, ending with the assistant's turn header when ``add_generation_prompt``."""
    compiled = _compile(template)
    variables = dict(special_tokens, messages=check_messages(messages), add_generation_prompt=add_generation_prompt)
    try:
        return bounded_render(compiled, variables)
    except TEMPLATE_FAILURES as exc:
        raise InvalidArgumentError(f"the chat template failed on this conversation: {type(exc).__name__}: "
                                   f"{_first_line(exc)}") from exc


def fit_conversation(messages: Messages, fits: Callable[[Messages], bool]) -> tuple[list[dict[str, Any]], int]:
    """Drop the oldest turns (never a leading system message, never the last message) until ``fits`` says the
    conversation fits; returns what is kept and how many messages were dropped. A turn goes whole: after a drop
    the kept part starts at a user message, as templates that check alternation expect. If even the last message
    alone does not fit, what is returned still does not: the caller says so."""
    messages = [dict(m) for m in messages]
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    body = messages[len(head):]
    dropped = 0
    while len(body) > 1 and not fits(head + body):
        cut = 1
        while cut < len(body) - 1 and body[cut].get("role") != "user":
            cut += 1  # the rest of the oldest turn: its answer, tool calls and results
        body = body[cut:]
        dropped += cut
    return head + body, dropped

"""Chat prompts: a bundle's chat template rendered as transformers' ``apply_chat_template`` renders it.

The template is Jinja (a model's own, stored in the manifest at export) and runs in Jinja's immutable sandbox with
the same settings and helpers transformers gives templates: trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, ``strftime_now`` and a ``tojson`` that does not HTML-escape. The special tokens (bos_token,
eos_token, ...) are template variables, and the rendered text is tokenized without adding special tokens again.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from specx.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant", "tool")
Messages = Sequence[Mapping[str, Any]]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise InvalidArgumentError(f"the bundle's chat template does not parse ({exc}); re-export the bundle") from exc


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
    try:
        return _compile(template).render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidArgumentError(f"the chat template refused this conversation: {exc}") from exc

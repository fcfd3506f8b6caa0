"""Checks of the Python API's arguments: a wrong type or value is an InvalidArgumentError naming the argument, never a
bare TypeError or KeyError from deep inside, nor a value silently read as something else (bytes as token ids, 2.7
as token 2)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from specx.errors import InvalidArgumentError

# A prompt: text, token ids, or chat messages ({"role", "content"} mappings).
PromptKind = str  # "text" | "ids" | "messages"
_SEQUENCES = (list, tuple, range, np.ndarray)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An integer (not a bool, not a float), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def check_number(name: str, value: Any) -> float:
    """A finite real number (ints allowed, bools not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_optional_number(name: str, value: Any) -> float | None:
    return None if value is None else check_number(name, value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")
    return value


def check_text(name: str, text: str) -> str:
    """Text that can be encoded as UTF-8 (a lone surrogate, e.g. from undecodable command-line bytes, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{name} is not valid UTF-8 text (character {exc.start} is "
                                   f"{text[exc.start]!r}, an undecodable byte or a lone surrogate); pass UTF-8 "
                                   "text") from exc
    return text


def prompt_kind(prompt: Any) -> PromptKind:
    """What a prompt is, or an InvalidArgumentError saying what a prompt may be."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError("the prompt is bytes; pass text as str (e.g. prompt.decode('utf-8')) or token ids "
                                   "as a list of ints")
    if isinstance(prompt, Mapping):
        raise InvalidArgumentError("the prompt is a single mapping; pass chat messages as a list, e.g. "
                                   "[{'role': 'user', 'content': '...'}]")
    if not isinstance(prompt, _SEQUENCES):
        raise InvalidArgumentError(f"the prompt must be text (str), token ids (a list of ints) or chat messages (a "
                                   f"list of {{'role', 'content'}} mappings), got {type(prompt).__name__}")
    if len(prompt) and all(isinstance(m, Mapping) for m in prompt):
        return "messages"
    return "ids"


def token_ids(prompt: Sequence[Any], vocab_size: int) -> tuple[int, ...]:
    """Token ids as ints in [0, vocab_size): ints and numpy integers only (a float is refused, not truncated)."""
    ids = []
    for position, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise InvalidArgumentError(f"prompt token ids must be integers; item {position} is {token!r} "
                                       f"({type(token).__name__})")
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(f"prompt token ids must lie in [0, {vocab_size}); item {position} is {token}")
        ids.append(int(token))
    return tuple(ids)

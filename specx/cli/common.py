"""What the commands share: the typer app they register on, the choices of their options, and how a user's error
becomes one `error:` line."""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import Iterator, Optional

import typer

from specx.errors import InvalidArgumentError, SpecxError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export Hugging Face models to ONNX bundles and run speculative decoding on ONNX Runtime.")


class Mode(str, Enum):
    auto = "auto"
    autoregressive = "autoregressive"
    speculative = "speculative"
    staged = "staged"
    ngram = "ngram"


class DraftChoice(str, Enum):
    auto = "auto"
    sample = "sample"
    top = "top"


class Provider(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"
    fp16_int8 = "fp16-int8"
    fp16_int4 = "fp16-int4"
    bf16 = "bf16"


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one line on stderr and exit code 1 (no traceback)."""
    try:
        yield
    except SpecxError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")


@contextlib.contextmanager
def needs_extra(command: str, extra: str) -> Iterator[None]:
    """Imports inside: a missing package becomes one error line naming the extra to install."""
    try:
        yield
    except ImportError as exc:
        raise SpecxError(f"{command} needs the {extra} extra ({exc.name} is missing): "
                         f"pip install 'specx[{extra}]'") from exc


def capped_threads(threads: Optional[int]) -> Optional[int]:
    """--threads, lowered to this machine's cores with a warning (100,000 hung)."""
    from specx.runtime.session import cap_threads

    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    threads, lowered = cap_threads(threads)
    if lowered:
        typer.echo(f"warning: {lowered}", err=True)
    return threads


def numbers(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers (--temperatures 0,0.7,1)."""
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated numbers like 0,1; got {text!r}") from None


def tree_text(tree: dict) -> str:
    """' tree BxD threshold V[ floor F]' of a tuning candidate or record; '' for plain decoding."""
    if tree.get("mode") == "autoregressive":
        return ""
    floor = f" floor {tree['tree_floor']:g}" if tree.get("tree_floor") else ""
    threshold = tree.get("tree_threshold") or 0.0
    return f" tree {tree.get('tree_budget')}x{tree.get('tree_depth')} threshold {threshold:g}{floor}"

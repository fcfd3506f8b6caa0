"""A Jinja sandbox bounded in work, time and size, for chat templates (foreign code that a bundle carries).

Jinja's sandbox blocks unsafe attributes but not unbounded work: nested loops run for hours, ``'x' * 10**10`` asks
for gigabytes and ``10 ** 10 ** 10`` never finishes. Here, during a render started with ``bounded_render``:

- every loop iteration, call, attribute or item lookup, operator, filter and test is one operation of a budget
  (TEMPLATE_OPERATIONS), and the render has a deadline (TEMPLATE_SECONDS);
- ``*``, ``+``, ``**`` and ``%`` on strings, lists and integers, and number arguments of calls and filters, are
  checked before they run (TEMPLATE_CHARS items, TEMPLATE_INT_BITS bits);
- the output is counted as it is produced (TEMPLATE_CHARS).

Going past a limit raises jinja2's SecurityError (a TemplateError) naming the limit.
"""

from __future__ import annotations

import functools
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_OPERATIONS = 1_000_000  # a long real conversation renders in tens of thousands
TEMPLATE_SECONDS = 2.0
TEMPLATE_CHARS = 4_000_000  # characters of output, and of any string or list built on the way
TEMPLATE_INT_BITS = 1 << 16
LOOP_GUARD = "specx_counted_loop"  # the filter every for-loop's iterable goes through
_SIZED = (str, list, tuple)
_FORMAT_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?|\{[^{}]*:[^{}\d]*(\d+)(?:\.(\d+))?[^{}]*\}")
_GUARDED = "_specx_guarded"  # marks a filter or test already wrapped


@dataclass
class _Budget:
    operations: int
    deadline: float

    def spend(self) -> None:
        self.operations -= 1
        if self.operations < 0:
            raise SecurityError(f"the chat template ran more than {TEMPLATE_OPERATIONS:,} operations")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"the chat template ran longer than {TEMPLATE_SECONDS:g} s")


_BUDGET: ContextVar[_Budget | None] = ContextVar("specx_template_budget", default=None)


def _spend() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(size: int, what: str) -> None:
    if size > TEMPLATE_CHARS:
        raise SecurityError(f"the chat template built {what} of {size:,} items (the limit is {TEMPLATE_CHARS:,})")


def _check_bits(bits: int) -> None:
    if bits > TEMPLATE_INT_BITS:
        raise SecurityError(f"the chat template built an integer of about {bits:,} bits (the limit is "
                            f"{TEMPLATE_INT_BITS:,})")


def _check_numbers(values: Iterable[Any]) -> None:
    """No call or filter of a chat template needs a number larger than the longest output it may build."""
    for value in values:
        if _is_int(value) and abs(value) > TEMPLATE_CHARS:
            raise SecurityError(f"the chat template passed the number {value:.3g} to a call (the limit is "
                                f"{TEMPLATE_CHARS:,})")


def _check_format(text: str) -> None:
    """Field widths and precisions of a %-format or str.format string."""
    for match in _FORMAT_WIDTHS.finditer(text):
        _check_numbers(int(n) for n in match.groups() if n)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        _check_bits(abs(left).bit_length() * right)
    elif operator == "*" and _is_int(left) and _is_int(right):
        _check_bits(abs(left).bit_length() + abs(right).bit_length())
    elif operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, _SIZED) and _is_int(count):
                _check_size(len(sequence) * count, f"a {type(sequence).__name__}")
    elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
        _check_size(len(left) + len(right), f"a {type(left).__name__}")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)


def _check_call(obj: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """String methods: number arguments (center, ljust, zfill, ...), and the two whose output grows with the product
    of their inputs."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    _check_numbers([*args, *kwargs.values()])
    if not args:
        return
    if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        _check_size(len(owner) + (len(owner) + 1) * len(args[1]), "a string")
    elif name == "join" and isinstance(args[0], (list, tuple)):
        _check_size(sum(len(x) for x in args[0] if isinstance(x, str)) + len(owner) * len(args[0]), "a string")


def _checked_result(value: Any) -> Any:
    if isinstance(value, _SIZED):
        _check_size(len(value), f"a {type(value).__name__}")
    return value


def _counted_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """A for-loop's iterable, one operation per iteration."""
    for item in iterable:
        _spend()
        yield item


def _guard(function: Callable, formats: bool = False) -> Callable:
    """A filter or test that counts as an operation and refuses huge number arguments and results; ``formats``: its
    value is a %-format string (the ``format`` filter)."""
    if getattr(function, _GUARDED, False):
        return function
    value = 1 if getattr(function, "jinja_pass_arg", None) else 0  # (context or environment,) value, arguments

    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _spend()
        _check_numbers([*args[value + 1:], *kwargs.values()])
        if formats and len(args) > value and isinstance(args[value], str):
            _check_format(args[value])
        return _checked_result(function(*args, **kwargs))

    setattr(guarded, _GUARDED, True)
    return guarded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every operation counted against the render's budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        _spend()
        _check_call(__obj, args, kwargs)
        return _checked_result(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format(value.__self__)
        return wrapped

    def compile_bounded(self, source: str) -> jinja2.Template:
        """Parse ``source`` and route every loop's iterable through the counting guard."""
        self.filters = {name: _guard(f, formats=name == "format") for name, f in self.filters.items()}
        self.tests = {name: _guard(f) for name, f in self.tests.items()}
        self.filters[LOOP_GUARD] = _counted_loop
        tree = self.parse(source)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
        tree.set_environment(self)
        return self.from_string(tree)


def bounded_render(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    """Render with a fresh budget; the output is counted as it is produced."""
    token = _BUDGET.set(_Budget(TEMPLATE_OPERATIONS, time.monotonic() + TEMPLATE_SECONDS))
    try:
        pieces, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            _check_size(size, "an output")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)

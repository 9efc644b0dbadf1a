"""JSON read from files and records, refused with one line when later code could not use it.

``json.loads`` accepts what a program cannot carry through: nesting deep enough to exhaust the recursion limit
(here or in whatever walks the value next), integers of more digits than Python converts, and ``\\ud800``-style
escapes of lone UTF-16 surrogates, which decode to a ``str`` that no UTF-8 file, tokenizer or Parquet column
can hold. :func:`loads` refuses all three, and a byte-order mark, naming where (file, ``file:line``) and the
line and column within the text.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from .errors import InputError, RetrievalSpecError

MAX_DEPTH = 100  # nested objects and arrays; manifests need 4, corpus records rarely 10
BOM = "\ufeff"

_SURROGATE_ESCAPE = re.compile(r"(\\+)u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JsonProblem(ValueError):
    """What makes a JSON text unusable, without where it came from."""


def loads(text: str, where: str, error: type[RetrievalSpecError] = InputError) -> Any:
    """The value of a JSON text (:func:`parse`), or ``error`` naming ``where`` and what is wrong.

    Args:
        text: the JSON text, already decoded.
        where: the file, or ``file:line`` for a line of JSONL, that starts the message.
        error: the exception raised (``InputError`` for what a user gives, ``DatastoreFormatError`` for files of
            ours).
    """
    try:
        return parse(text)
    except JsonProblem as problem:
        raise error(f"{where}: {problem}") from None


def parse(text: str) -> Any:
    """The value of a JSON text; a byte-order mark in front is skipped (editors on Windows write one).

    Raises:
        JsonProblem: not JSON, nested more than :data:`MAX_DEPTH` levels, an integer of more digits than Python
            converts, or a lone surrogate escape; the message says which, and where in the text.
    """
    text = text.removeprefix(BOM)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as problem:
        raise JsonProblem(f"not valid JSON ({problem.msg} at {_place(text, problem.pos)})") from None
    except RecursionError:
        raise JsonProblem("not usable JSON (nested too deeply)") from None
    except ValueError:  # the one other error json raises: an integer of more digits than Python converts
        raise JsonProblem(f"not usable JSON (an integer of more than {sys.get_int_max_str_digits()} digits)"
                          ) from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise JsonProblem("not usable JSON (nested too deeply)")
    if "\\u" in text:
        lone = _lone_surrogate(text)
        if lone is not None:
            raise JsonProblem(f"not usable JSON (the escape {text[lone:lone + 6]} at {_place(text, lone)} is half "
                              "of a UTF-16 surrogate pair, not a character)")
    return value


def _place(text: str, offset: int) -> str:
    """``column C`` within a one-line text, else ``line L, column C``."""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"column {column}" if "\n" not in text.rstrip("\n") else f"line {line}, column {column}"


def _depth(value: Any) -> int:
    """Levels of nested objects and arrays, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _lone_surrogate(text: str) -> int | None:
    """Offset of the first ``\\uD800``-``\\uDFFF`` escape that is not half of a high-low pair, else None."""
    waiting: tuple[int, int] | None = None  # (start, end) of a high half whose low half must follow at once
    for match in _SURROGATE_ESCAPE.finditer(text):
        if len(match.group(1)) % 2 == 0:
            continue  # an escaped backslash followed by the letters "ud..."
        start = match.end() - 6
        high = match.group()[-3].lower() in "89ab"
        if waiting is not None:
            if not high and start == waiting[1]:
                waiting = None
                continue
            return waiting[0]
        if not high:
            return start
        waiting = (start, match.end())
    return None if waiting is None else waiting[0]

"""Reading what clients send: JSON documents, whole numbers and text, each parsed with an
explicit bound, every failure a ValueError with a message a client can act on (the callers
turn it into their protocol's 4xx). No Ray, no torch, no web framework.

Python's own parsers fail in ways no caller expects: `json.loads` raises RecursionError on
deeply nested arrays and returns lone surrogates ("\\ud800") that cannot be encoded back to
UTF-8 (the answer then fails after the work is done); `str.isdigit()` accepts "²", which
`int()` refuses; `float()` of a 400-digit integer raises OverflowError.
"""

from __future__ import annotations

import json
import math
import re

_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits only; 18 fit an int64
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def whole_number(text: str, name: str, maximum: int) -> int:
    """A whole number written in ASCII digits, at most `maximum`."""
    stripped = text.strip()
    if not _DIGITS.fullmatch(stripped) or int(stripped) > maximum:
        raise ValueError(f"{name} must be a whole number from 0 to {maximum}, not "
                         f"{text[:40]!r}")
    return int(stripped)


def _shown(value) -> str:
    """A client's value for a message, short (an integer of 5,000 digits cannot even be
    printed: Python refuses to)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:40]


def finite_float(value, name: str) -> float:
    """A JSON number as a finite float (no bool, no 400-digit integer, no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, not {_shown(value)}")
    return number


def check_text(text: str, name: str) -> str:
    """Text that can be encoded as UTF-8 (no lone surrogates), as it was."""
    if _SURROGATE.search(text):
        raise ValueError(f"{name} holds a lone surrogate (\\ud800-\\udfff): not UTF-8 text")
    return text


def _check_strings(document) -> None:
    """Every string in a parsed document (keys too) encodable as UTF-8; no recursion."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, "a string")
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())


def load_json(data: bytes | str):
    """A JSON document; ValueError for invalid JSON, nesting deeper than Python's parser
    goes, and strings that are not UTF-8 text. Bytes must be UTF-8 (RFC 8259), strictly:
    `json.loads` would also take UTF-16 or UTF-32, and UTF-8-encoded surrogates."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the JSON is not UTF-8 text: {exc.reason}") from None
    else:
        text = check_text(data, "the JSON")
    try:
        document = json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers of over 4300 digits
        raise ValueError(f"not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):  # only then can a lone surrogate be in it
        _check_strings(document)
    return document

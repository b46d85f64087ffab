"""JSON from an untrusted checkpoint file, parsed with bounded effort and serde_json's strictness.

Python's `json.loads` recurses once per nesting level (a header of 100,000 `[` raises RecursionError), turns a
5000-digit integer into a ValueError (int_max_str_digits), and accepts what JSON forbids: `NaN`, `Infinity`,
numbers that overflow a double, strings holding a lone UTF-16 surrogate ("\\ud800", which no UTF-8 file name
or dict key can hold). The reference safetensors library parses headers with Rust's serde_json, which refuses
all of these. `loads` does the same, every refusal a `JSONError`:
- nesting: a cheap pre-scan (strings blanked out, then a running count of brackets) refuses a document nested
  deeper than `max_depth` before `json.loads` sees it; serde_json's limit is 127 levels.
- numbers, as serde_json reads them: an integer literal within [-2**63, 2**64) is an int; any other integer
  literal (`-0` included) and every literal with a fraction or exponent is a float, refused when it overflows
  to infinity. A long literal is never converted to an int, so its length costs nothing.
- `NaN`, `Infinity`, `-Infinity`: refused. A lone surrogate in any string or key: refused.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

SERDE_MAX_DEPTH = 127  # serde_json's recursion limit (128) counts the value being opened: 127 levels parse

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONError(ValueError):
    """Input that is not JSON as serde_json reads it, or is nested deeper than allowed."""


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of `text` (exact for valid JSON; strings are skipped)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _number_out_of_range(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise JSONError(f"number out of range: {literal[:40]}{'...' if len(literal) > 40 else ''}")
    return value


def _integer(literal: str) -> int | float:
    if len(literal) <= 20:  # at most 20 digits, or '-' and 19: cheap to convert exactly
        value = int(literal)
        if -(2**63) <= value < 2**64 and literal != "-0":
            return value
    return _number_out_of_range(literal)  # serde_json reads it as a double


def _constant(name: str):
    raise JSONError(f"{name} is not JSON")


def _check_strings(value) -> None:
    """Refuse a lone surrogate in a string, or in the strings of a (nested) list."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise JSONError(f"lone surrogate in string {value[:40]!r}")
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def loads(text: str, *, max_depth: int = SERDE_MAX_DEPTH, object_pairs_hook=dict):
    """`json.loads(text)` with the refusals above; `object_pairs_hook(pairs)` builds each object, as in json."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JSONError(f"nested {depth} levels deep, more than the {max_depth} allowed")

    def build(pairs):
        for key, value in pairs:
            _check_strings(key)
            _check_strings(value)
        return object_pairs_hook(pairs)

    try:
        value = json.loads(
            text,
            parse_int=_integer,
            parse_float=_number_out_of_range,
            parse_constant=_constant,
            object_pairs_hook=build,
        )
    except json.JSONDecodeError as error:
        raise JSONError(str(error)) from None
    _check_strings(value)
    return value

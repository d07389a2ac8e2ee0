"""Strict JSON for untrusted request bodies: data, never a way to crash or confuse the gateway.

:func:`parse_request_json` accepts exactly RFC 8259 JSON in UTF-8 and refuses, with a reason a
caller can act on:

* nesting deeper than :data:`MAX_DEPTH` arrays/objects (Python's parser would otherwise
  recurse until ``RecursionError``, a 500);
* a key given twice in one object (the standard library keeps the last value silently, so what
  one reader sees first is not what runs);
* ``NaN``, ``Infinity`` and numbers that overflow a float (``1e999``);
* bytes that are not UTF-8.

Pure: no I/O, no server imports. The gateway maps :class:`RequestJsonInvalid` to a 422
``invalid-request`` problem (audited as a ``deny`` on job submission).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "RequestJsonInvalid", "parse_request_json"]

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have (fedgate's own bodies use 3)."""


class RequestJsonInvalid(ValueError):
    """The body is not acceptable JSON; ``str()`` says why."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestJsonInvalid(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise RequestJsonInvalid(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestJsonInvalid(f"the number {text[:40]} is not finite as a float")
    return value


def _depth_at_most(raw: str, limit: int) -> bool:
    """True iff no array/object nesting outside strings is deeper than ``limit`` (linear)."""
    depth, in_string, escaped = 0, False, False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def parse_request_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, or :class:`RequestJsonInvalid` (see the module contract)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestJsonInvalid("the body must be UTF-8 encoded JSON") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and not _depth_at_most(text, MAX_DEPTH):
        raise RequestJsonInvalid(f"the body is nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant,
                          parse_float=_float)
    except RequestJsonInvalid:
        raise
    except (ValueError, RecursionError):
        raise RequestJsonInvalid("the body must be valid JSON") from None

"""RFC 8785 (JCS) canonical JSON: one validating walk, then the fastest encoder that is exact.

The walk checks that a value is JSON (dict with str keys, list/tuple, str, int within the IEEE
double safe range, finite float that is not a whole number of magnitude in [2**53, 1e21), bool,
None), bounded in depth, and notes whether the value can
take the fast path:

* **fast path** (no floats anywhere, every object key ASCII): `json.dumps(sort_keys=True,
  ensure_ascii=False, separators=(",", ":"))` then UTF-8. This is byte-identical to JCS because
  (1) without floats every number is an int, which both print as plain decimal; (2) for ASCII
  keys, code point order equals the UTF-16 code unit order JCS sorts by; (3) both escape exactly
  `"`, `\\` and U+0000..U+001F, with the short forms \\b \\t \\n \\f \\r and lowercase `\\u00xx`
  otherwise, and write every other character as UTF-8. `tests/unit/test_jcs.py` checks this
  claim against the `rfc8785` package with hypothesis.
* **exact path** (any float, or a non-ASCII key): `rfc8785.dumps`, the reference.

A lone surrogate in any string is not UTF-8: both paths refuse it (`InvalidRecord`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import rfc8785

from .errors import InvalidRecord, _printable

__all__ = [
    "EXPONENT_FROM",
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "DuplicateKey",
    "dumps",
    "json_path",
    "loads",
    "walk",
]

MAX_SAFE_INTEGER: Final = 2**53 - 1
"""Largest integer JCS can carry exactly (numbers are IEEE doubles)."""

MAX_DEPTH: Final = 64
"""Deepest nesting of arrays/objects accepted in a payload."""

EXPONENT_FROM: Final = 1e21
"""JCS (ES6 number formatting) writes a number in exponent form from this magnitude on."""

_UNSAFE_WHOLE: Final = float(2**53)

_FAST: Final = 0
_EXACT: Final = 1  # needs rfc8785 (a float, or a non-ASCII key)


def _no_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# json.dumps(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False), with
# the C encoder built once (JSONEncoder.encode builds it again on every call). No circular
# check: `walk` bounds the depth first, which catches cycles.
_c_encoder = json.encoder.c_make_encoder  # type: ignore[attr-defined]
if _c_encoder is not None:
    _iterencode = _c_encoder(
        None, _no_default, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )

    def _fast_encode(value: Any) -> str:
        return "".join(_iterencode(value, 0))

else:  # pragma: no cover - CPython always has the C accelerator
    _fast_encode = json.JSONEncoder(  # type: ignore[assignment]
        ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode


class _Bad(Exception):
    """Internal: a walk failure; `parts` is the reversed JSON path (keys and indexes)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[str | int] = []


def json_path(root: str, parts: list[str | int]) -> str:
    """Render a reversed list of keys/indexes as a JSON path below `root` (e.g. `$.payload`).

    The path is printable text: a key holding control characters or a lone surrogate is
    written with `\\uXXXX` escapes (the path names the key, it need not be JSON).
    """
    out = [root]
    for part in reversed(parts):
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.isidentifier():
            out.append(f".{part}")
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return _printable("".join(out))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _walk(value: Any, depth: int) -> int:
    # Exact types first: they are what JSON decoding produces and what callers nearly always
    # pass; subclasses (IntEnum, OrderedDict, ...) take the isinstance branches below.
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return _FAST
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return _FAST
        raise _Bad(
            f"integer {value} is outside the JSON safe range +/-(2**53-1) "
            "(JCS numbers are IEEE doubles); send it as a string"
        )
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise _Bad(f"payload nests deeper than {MAX_DEPTH} levels")
        flags = _FAST
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise _Bad(f"object key {key!r} is a {type(key).__name__}, keys must be str")
            if not key.isascii():
                flags = _EXACT
            try:
                flags |= _walk(item, depth + 1)
            except _Bad as bad:
                bad.parts.append(key)
                raise
        return flags
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise _Bad(f"payload nests deeper than {MAX_DEPTH} levels")
        flags = _FAST
        for index, item in enumerate(value):
            try:
                flags |= _walk(item, depth + 1)
            except _Bad as bad:
                bad.parts.append(index)
                raise
        return flags
    if kind is float:
        if math.isfinite(value):
            # Every double of magnitude >= 2**53 is a whole number; below 1e21 JCS prints it as
            # a plain integer literal that no reader can take back exactly (RFC 8785 3.2.2.3):
            # refused, however it was written (1e16, 10000000000000000.0).
            if _UNSAFE_WHOLE <= abs(value) < EXPONENT_FROM:
                raise _Bad(
                    f"number {value!r} is a whole number of magnitude in [2**53, 1e21): JCS "
                    "writes it as an integer literal beyond +/-(2**53-1), which cannot be read "
                    "back exactly; send it as a string"
                )
            return _EXACT
        raise _Bad(f"float {value!r} is not a JSON number (NaN and infinities are not allowed)")
    # Subclasses of the JSON types behave as their base type.
    if isinstance(value, bool):
        return _FAST
    if isinstance(value, int):
        return _walk(int(value), depth)
    if isinstance(value, float):
        return _walk(float(value), depth)
    if isinstance(value, str):
        return _FAST
    if isinstance(value, dict):
        return _walk(dict(value), depth)
    if isinstance(value, (list, tuple)):
        return _walk(list(value), depth)
    raise _Bad(f"{_describe(value)} is not a JSON value (dict, list, str, int, float, bool, None)")


def walk(value: Any, root: str) -> bool:
    """Validate that `value` is JSON; return True when the fast encoder is exact for it.

    Raises:
        InvalidRecord: naming the rule and the JSON path (below `root`) of the bad value.
    """
    try:
        return _walk(value, 0) == _FAST
    except _Bad as bad:
        raise InvalidRecord(bad.message, path=json_path(root, bad.parts)) from None
    except RecursionError:
        raise InvalidRecord(f"payload nests deeper than {MAX_DEPTH} levels", path=root) from None


def _find_surrogate(value: Any, parts: list[str | int]) -> bool:
    """Fill `parts` (reversed) with the path of the first string holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        for key, item in value.items():
            if _find_surrogate(key, parts) or _find_surrogate(item, parts):
                parts.append(key)
                return True
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if _find_surrogate(item, parts):
                parts.append(index)
                return True
    return False


def dumps(value: Any, fast: bool, root: str = "$") -> bytes:
    """Canonical (JCS) bytes of a value already checked by `walk` (its result is `fast`).

    Raises:
        InvalidRecord: a string holds a lone surrogate (not encodable as UTF-8).
    """
    try:
        if fast:
            return _fast_encode(value).encode("utf-8")
        return rfc8785.dumps(value)
    except (UnicodeEncodeError, rfc8785.CanonicalizationError):
        parts: list[str | int] = []
        _find_surrogate(value, parts)
        raise InvalidRecord(
            "string holds a lone surrogate code point (not valid UTF-8)",
            path=json_path(root, parts),
        ) from None


class DuplicateKey(ValueError):
    """A JSON object names the same member twice (I-JSON, RFC 7493 section 2.3, forbids it).

    Attributes:
        key: the repeated member name.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"the object member {_printable(json.dumps(key, ensure_ascii=False))} appears more "
            "than once (I-JSON, RFC 7493, forbids duplicate names)"
        )


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def loads(data: str | bytes) -> Any:
    """Parse JSON text as I-JSON: like `json.loads`, but an object with a duplicate member
    name is refused (`json.loads` silently keeps the last one).

    Numbers parse as Python does (int for integer literals, float otherwise); `walk` then
    applies the number domain (see the module docstring).

    Raises:
        DuplicateKey: an object names a member twice.
        ValueError: not JSON (`json.JSONDecodeError`), or not UTF-8.
        RecursionError: nested deeper than the parser's recursion limit.
    """
    return json.loads(data, object_pairs_hook=_unique_members)

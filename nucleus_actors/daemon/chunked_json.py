"""Parse a large JSON request body without holding the event loop for the whole parse.

`json.loads` of a 4 MiB batch is one long step (and a worker thread does not help: the parser
holds the GIL). `loads_chunked` parses the top-level object member by member and the elements
of a top-level array member (a batch's `records`) one at a time with
`json.JSONDecoder.raw_decode`, yielding to trio (`trio.lowlevel.checkpoint`) whenever a slice
of `SLICE_SECONDS` has passed, so `/healthz` and other requests run between slices.

The result is the one `_jcs.loads` gives (I-JSON: a duplicate member name raises
`DuplicateKey`), and so is every error: whenever anything is off (not an object, bad JSON, a
duplicate name, trailing data, ...), the body is parsed again by `_jcs.loads`, which raises
exactly what the route raised before (the error path is rare, and bounded by
`max_body_bytes`).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Final

import trio

from .. import _jcs

__all__ = ["SLICE_SECONDS", "loads_chunked"]

SLICE_SECONDS = 0.002
"""Longest stretch of parsing between two checkpoints (seconds, roughly: one element at least)."""

SMALL_BODY: Final = 64 << 10
"""Bodies up to this size are parsed in one call (they take well under a slice)."""

_WS: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_jcs._unique_members)


class _Fallback(Exception):
    """The incremental parse met something it leaves to `_jcs.loads`."""


async def loads_chunked(body: bytes, *, slice_seconds: float | None = None) -> Any:
    """`_jcs.loads(body)`, with checkpoints between slices of about `slice_seconds`
    (default `SLICE_SECONDS`).

    Cancellation: a checkpoint may raise `trio.Cancelled`; nothing is kept.

    Raises:
        DuplicateKey: an object names a member twice.
        ValueError: not JSON (`json.JSONDecodeError`), or not UTF-8/16/32.
        RecursionError: nested deeper than the parser's recursion limit.
    """
    if len(body) <= SMALL_BODY:
        return _jcs.loads(body)
    try:
        # What json.loads does with bytes (a UTF-8 BOM is dropped by "utf-8-sig").
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        return await _parse_object(text, SLICE_SECONDS if slice_seconds is None else slice_seconds)
    except (_Fallback, ValueError, RecursionError):
        return _jcs.loads(body)  # raises what a whole-body parse raises (or agrees)


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after `i`."""
    match = _WS.match(text, i)
    assert match is not None  # `[...]*` matches the empty string
    return match.end()


async def _parse_object(text: str, slice_seconds: float) -> dict[str, Any]:
    ws = _skip
    decode = _DECODER.raw_decode
    clock = time.perf_counter
    deadline = clock() + slice_seconds
    i = ws(text, 0)
    if not text.startswith("{", i):
        raise _Fallback
    i = ws(text, i + 1)
    pairs: list[tuple[str, Any]] = []
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                raise _Fallback
            key, i = decode(text, i)
            i = ws(text, i)
            if not text.startswith(":", i):
                raise _Fallback
            i = ws(text, i + 1)
            if text.startswith("[", i):
                items: list[Any] = []
                i = ws(text, i + 1)
                if text.startswith("]", i):
                    i += 1
                else:
                    while True:
                        item, i = decode(text, i)
                        items.append(item)
                        if clock() > deadline:
                            await trio.lowlevel.checkpoint()
                            deadline = clock() + slice_seconds
                        i = ws(text, i)
                        if text.startswith(",", i):
                            i = ws(text, i + 1)
                        elif text.startswith("]", i):
                            i += 1
                            break
                        else:
                            raise _Fallback
                value: Any = items
            else:
                value, i = decode(text, i)
            pairs.append((key, value))
            i = ws(text, i)
            if text.startswith(",", i):
                i = ws(text, i + 1)
            elif text.startswith("}", i):
                i += 1
                break
            else:
                raise _Fallback
    if ws(text, i) != len(text):
        raise _Fallback  # trailing data
    return _jcs._unique_members(pairs)

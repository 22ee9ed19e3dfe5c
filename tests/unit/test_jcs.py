"""Canonical bytes are byte-identical to the `rfc8785` reference on every JSON value."""

from __future__ import annotations

from typing import Any

import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus_actors import Record, _jcs
from nucleus_actors.hashing import canonical_bytes

# Text without lone surrogates (they are not UTF-8 and are refused by both sides).
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_keys = st.one_of(
    _text,
    st.text(
        st.characters(min_codepoint=0xE000, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
        max_size=4,
    ),
    st.text(st.characters(max_codepoint=0x7F), max_size=6),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1),
    # Whole doubles of magnitude in [2**53, 1e21) are refused (test_numbers.py).
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not 2**53 <= abs(x) < 1e21),
    _text,
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=30,
)
# The fast path's domain: no floats, ASCII keys.
_fast_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53 - 1), 2**53 - 1), _text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(st.characters(max_codepoint=0x7F), max_size=6), inner, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=400)
@given(_json)
def test_dumps_matches_rfc8785(value: Any) -> None:
    fast = _jcs.walk(value, "$")
    assert _jcs.dumps(value, fast) == rfc8785.dumps(value)


@settings(max_examples=400)
@given(_fast_json)
def test_fast_path_is_taken_and_exact(value: Any) -> None:
    assert _jcs.walk(value, "$") is True
    assert _jcs.dumps(value, True) == rfc8785.dumps(value)


@settings(max_examples=200)
@given(
    kind=st.text(
        st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc", "Cf")),
        min_size=1,
        max_size=10,
    ).filter(lambda k: k.strip() == k and "\x85" not in k and all(not c.isspace() for c in k)),
    payload=_json,
    meta=st.dictionaries(_keys.filter(bool), _text, max_size=3),
    seq=st.integers(0, 2**40),
    ts=st.integers(0, 2**53 - 1),
)
def test_canonical_bytes_match_rfc8785_of_the_whole_record(
    kind: str, payload: Any, meta: dict[str, str], seq: int, ts: int
) -> None:
    record = Record(kind, payload, meta, seq=seq, timestamp=ts)
    expected = rfc8785.dumps({"kind": kind, "meta": meta, "payload": payload, "seq": seq, "ts": ts})
    assert canonical_bytes(record) == expected


def test_known_edge_cases() -> None:
    cases = [
        {"\U0001f600": 1, "\ue000": 2, "a": 3},  # UTF-16 order differs from code point order
        [1e21, 1e-7, -0.0, 5e-324, 1.0, 4503599627370495.5],
        'control \x00\x01\x1f\x7f \u2028 "quoted" back\\slash',
        {"b": [], "a": {}},
    ]
    for value in cases:
        assert _jcs.dumps(value, _jcs.walk(value, "$")) == rfc8785.dumps(value)

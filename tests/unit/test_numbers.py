"""The number domain of canonical JSON (RFC 8785 section 3.2.2.3) and the RFC 8785 test data.

Whatever a record accepts must read back: its canonical bytes parse (as the storage decoder and
any third party parse them) into a value that canonicalizes to the same bytes, so the entry
exports, re-imports and verifies. Whole numbers of magnitude in [2**53, 1e21) cannot: JCS
writes them as integer literals beyond the exactly representable range. They are refused at
construction, however they are written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nucleus_actors import InvalidRecord, Record, _jcs
from nucleus_actors.hashing import (
    canonical_bytes,
    chain_step,
    decode_entry,
    genesis,
    verify_entries,
)

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "rfc8785"
if not VECTORS.is_dir():  # a worktree sits one level deeper than a plain checkout
    VECTORS = Path(__file__).resolve().parents[4] / "shared" / "vectors" / "rfc8785"


def _vector_names() -> list[str]:
    if not (VECTORS / "input").is_dir():
        return []
    return sorted(p.stem for p in (VECTORS / "input").glob("*.json"))


@pytest.mark.skipif(
    not _vector_names(),
    reason=f"the RFC 8785 test data is not at {VECTORS} (../shared/vectors/rfc8785)",
)
@pytest.mark.parametrize("name", _vector_names() or ["absent"])
def test_rfc8785_vector(name: str) -> None:
    """input/X.json canonicalizes to exactly output/X.json (cyberphone's test data)."""
    expected = (VECTORS / "output" / f"{name}.json").read_bytes()
    assert (VECTORS / "outhex" / f"{name}.txt").read_text().split() == [
        f"{byte:02x}" for byte in expected
    ]
    value = _jcs.loads((VECTORS / "input" / f"{name}.json").read_bytes())
    fast = _jcs.walk(value, "$")
    assert _jcs.dumps(value, fast) == expected
    assert rfc8785.dumps(value) == expected  # the reference agrees
    # As a payload: the committed bytes embed exactly the canonical value.
    record = Record("vector", value, seq=0, timestamp=1)
    assert canonical_bytes(record) == (
        b'{"kind":"vector","meta":{},"payload":' + expected + b',"seq":0,"ts":1}'
    )


def test_every_vector_ran() -> None:
    names = _vector_names()
    if not names:
        pytest.skip(f"the RFC 8785 test data is not at {VECTORS}")
    assert set(names) >= {"arrays", "french", "structures", "unicode", "values", "weird"}


REFUSED_LITERALS = [
    "1e16",
    "1E16",
    "10000000000000000.0",
    "10000000000000000",
    "9007199254740992",
    "9007199254740992.0",
    "-9007199254740992",
    "9007199254740993",
    "-9.007199254740992e15",
    "1e20",
    "100000000000000000000",
    "999999999999999900000.0",
    "123456789012345680.0",
]


@pytest.mark.parametrize("literal", REFUSED_LITERALS)
def test_whole_numbers_in_the_unsafe_range_are_refused_however_written(literal: str) -> None:
    value = _jcs.loads(literal)
    with pytest.raises(InvalidRecord, match="send it as a string") as info:
        Record("k", {"n": [value]})
    assert info.value.path == "$.payload.n[0]"


@pytest.mark.parametrize(
    "literal", ["9007199254740991", "-9007199254740991", "9007199254740991.0", "1e21", "-1e21",
                "1.5e300", "4503599627370495.5", "5e-324", "-0", "-0.0", "0.1"]
)  # fmt: skip
def test_numbers_just_outside_the_refused_range_are_accepted(literal: str) -> None:
    _round_trip(_jcs.loads(literal))


def _round_trip(value: Any) -> None:
    """Store `value` as a payload; the entry reads back, re-imports, verifies."""
    record = Record("n", {"v": value, "list": [value]}, seq=0, timestamp=1_700_000_000_000_000)
    data = canonical_bytes(record)
    head = chain_step(genesis("numbers"), 0, data)
    # Read back as storage does (the bytes are decoded with a standard JSON parser).
    entry = decode_entry(0, data, head)
    assert verify_entries([entry], prev=genesis("numbers")) == head
    # Re-import: a third party that parses the bytes and canonicalizes again gets them back.
    decoded = json.loads(data)
    assert rfc8785.dumps(decoded) == data
    again = Record(
        decoded["kind"], decoded["payload"], decoded["meta"], seq=decoded["seq"],
        timestamp=decoded["ts"],
    )  # fmt: skip
    assert canonical_bytes(again) == data
    assert again == record
    # The value read back is the same double (-0 reads back as 0, which JCS writes alike).
    back = decoded["payload"]["v"]
    assert back == value
    assert float(back) == float(value)


_SPECIAL = [
    2.0**53, -(2.0**53), 2.0**53 + 2, -(2.0**53 + 2), 2.0**53 - 1, -(2.0**53 - 1),
    float(2**53 + 1), 1e21, -1e21, math.nextafter(1e21, 0), math.nextafter(1e21, math.inf),
    5e-324, -5e-324, -0.0, 0.0, 1e-7, 1e16, 1e20, 1.7976931348623157e308,
]  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(_SPECIAL),
        st.integers(-(2**60), 2**60),
        st.integers(-(2**53) - 2, -(2**53) + 2) | st.integers(2**53 - 2, 2**53 + 2),
    )
)
@example(2.0**53 + 1)  # == 2**53: ties round to even
@example(float(-(2**53) - 1))
@example(-0.0)
def test_any_number_is_refused_or_reads_back_exactly(value: float | int) -> None:
    refused = abs(value) > 2**53 - 1 if isinstance(value, int) else 2**53 <= abs(value) < 1e21
    if refused:
        with pytest.raises(InvalidRecord, match="send it as a string"):
            Record("n", value)
        return
    _round_trip(value)

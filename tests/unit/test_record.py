"""Records: construction, validation rules (one test per InvalidRecord rule), derived copies."""

from __future__ import annotations

import enum
from collections import OrderedDict
from decimal import Decimal

import pytest

from nucleus_actors import Hash, InvalidRecord, NucleusError, Receipt, Record
from nucleus_actors.record import MAX_KIND_LENGTH


def test_record_defaults_and_fields() -> None:
    record = Record("order.created", {"id": 7})
    assert record.kind == "order.created"
    assert record.payload == {"id": 7}
    assert record.meta == {}
    assert record.seq is None
    assert record.timestamp is None
    assert not record.committed


def test_record_is_frozen() -> None:
    record = Record("k", 1)
    with pytest.raises(AttributeError):
        record.kind = "other"  # type: ignore[misc]


def test_record_equality_ignores_nothing_public() -> None:
    assert Record("k", {"a": 1}) == Record("k", {"a": 1})
    assert Record("k", {"a": 1}) != Record("k", {"a": 2})
    assert Record("k", 1, {"m": "x"}) != Record("k", 1)


def test_invalid_record_is_a_value_error_and_nucleus_error() -> None:
    assert issubclass(InvalidRecord, ValueError)
    assert issubclass(InvalidRecord, NucleusError)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("", r"kind must not be empty \(at \$\.kind\)"),
        ("x" * (MAX_KIND_LENGTH + 1), r"kind is 257 characters, the limit is 256"),
        ("order created", r"contains whitespace.* \(U\+0020 at index 5\)"),
        ("tab\tkind", r"contains whitespace.* \(U\+0009 at index 3\)"),
        ("nul\x00", r"non-printable character \(U\+0000 at index 3\)"),
        ("csi\x9b", r"non-printable character \(U\+009B at index 3\)"),  # C1 control
        ("zero\u200bwidth", r"non-printable character \(U\+200B at index 4\)"),  # Cf
        ("bom\ufeff", r"non-printable character \(U\+FEFF"),
        ("nbsp\xa0", r"non-printable character \(U\+00A0"),
        ("line\u2028sep", r"non-printable character \(U\+2028"),
        ("lone\ud800", r"non-printable character \(U\+D800"),
        ("tag\U000e0041", r"non-printable character \(U\+E0041"),
        (7, r"kind must be a str, got int"),
        (None, r"kind must be a str, got NoneType"),
    ],
)
def test_bad_kind(kind: object, match: str) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        Record(kind, {})  # type: ignore[arg-type]
    assert info.value.path == "$.kind"


def test_kind_at_limit_is_accepted() -> None:
    assert Record("k" * MAX_KIND_LENGTH, None).kind == "k" * MAX_KIND_LENGTH
    assert Record("commande.créée", None).kind == "commande.créée"


@pytest.mark.parametrize(
    ("payload", "match", "path"),
    [
        ({"a": {1, 2}}, r"set \{1, 2\} is not a JSON value", "$.payload.a"),
        ({"a": [0, b"x"]}, r"bytes b'x' is not a JSON value", "$.payload.a[1]"),
        ({"a": Decimal("1.5")}, r"Decimal .* is not a JSON value", "$.payload.a"),
        ({"a": float("nan")}, r"float nan is not a JSON number", "$.payload.a"),
        ({"a": [float("inf")]}, r"float inf is not a JSON number", "$.payload.a[0]"),
        ([-float("inf")], r"float -inf is not a JSON number", "$.payload[0]"),
        (
            {"n": 2**53},
            r"integer 9007199254740992 is outside .* send it as a string",
            "$.payload.n",
        ),
        ({"n": -(2**53)}, r"integer -9007199254740992 is outside", "$.payload.n"),
        ({1: "x"}, r"object key 1 is a int, keys must be str", "$.payload"),
        ({"b": {None: 1}}, r"object key None is a NoneType", "$.payload.b"),
        (
            {"weird key": [1, {"x": object()}]},
            r"object .* is not a JSON value",
            '$.payload["weird key"][1].x',
        ),
        ("\ud800", r"lone surrogate", "$.payload"),
        ({"a": ["ok", "bad\udfff"]}, r"lone surrogate", "$.payload.a[1]"),
    ],
)
def test_bad_payload_names_rule_and_path(payload: object, match: str, path: str) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        Record("k", payload)
    assert info.value.path == path
    assert path in str(info.value)


def test_safe_integer_bounds_are_accepted() -> None:
    Record("k", {"max": 2**53 - 1, "min": -(2**53 - 1)})


def test_too_deep_payload() -> None:
    payload: object = 1
    for _ in range(100):
        payload = [payload]
    with pytest.raises(InvalidRecord, match=r"nests deeper than 64 levels"):
        Record("k", payload)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"a": 1}, r"meta value must be a str, got int 1 \(at \$\.meta\.a\)"),
        ({1: "x"}, r"meta key 1 must be a non-empty str"),
        ({"": "x"}, r"meta key '' must be a non-empty str"),
        (["a"], r"meta must be a mapping of str to str, got list"),
        ({"a": "\ud800"}, r"lone surrogate"),
    ],
)
def test_bad_meta(meta: object, match: str) -> None:
    with pytest.raises(InvalidRecord, match=match):
        Record("k", {}, meta)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value"), [("seq", -1), ("timestamp", "x"), ("seq", True), ("timestamp", 2**53)]
)
def test_bad_positions(name: str, value: object) -> None:
    with pytest.raises(InvalidRecord, match=rf"{name} must be None or an int in \[0, 2\*\*53-1\]"):
        Record("k", 1, **{name: value})  # type: ignore[arg-type]


def test_json_subclasses_and_tuples_are_accepted() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str, enum.Enum):  # noqa: UP042 (the mixin form, on purpose)
        BOB = "bob"

    record = Record("k", OrderedDict(c=Color.RED, n=Name.BOB, t=(1, 2)))
    assert record.replace(seq=0, timestamp=0)


def test_replace_revalidates_and_keeps_other_fields() -> None:
    record = Record("k", {"a": 1}, {"m": "1"})
    changed = record.replace(payload={"a": 2})
    assert changed == Record("k", {"a": 2}, {"m": "1"})
    with pytest.raises(InvalidRecord, match="kind must not be empty"):
        record.replace(kind="")
    with pytest.raises(TypeError, match=r"unknown fields: \['colour'\]"):
        record.replace(colour=1)


def test_with_meta_adds_and_overrides() -> None:
    record = Record("k", 1, {"a": "1", "b": "2"})
    assert record.with_meta(b="3", c="4").meta == {"a": "1", "b": "3", "c": "4"}
    assert record.with_meta({"trace-id": "x"}).meta["trace-id"] == "x"
    assert record.meta == {"a": "1", "b": "2"}
    with pytest.raises(InvalidRecord, match="meta value must be a str"):
        record.with_meta(a=1)  # type: ignore[arg-type]


def test_meta_is_copied() -> None:
    meta = {"a": "1"}
    record = Record("k", 1, meta)
    meta["a"] = "2"
    assert record.meta == {"a": "1"}


def test_hash_value_type() -> None:
    digest = Hash(bytes(range(32)))
    assert Hash.from_hex(digest.hex()) == digest
    assert Hash.from_hex(digest.hex().upper()) == digest
    assert bytes(digest) == bytes(range(32))
    assert str(digest) == digest.hex()
    assert eval(repr(digest), {"Hash": Hash}) == digest
    assert len({digest, Hash(bytes(range(32)))}) == 1
    with pytest.raises(ValueError, match="a Hash is 32 bytes, got 3"):
        Hash(b"abc")
    with pytest.raises(ValueError, match="a Hash is 64 hex digits"):
        Hash.from_hex("zz" * 32)
    with pytest.raises(ValueError, match="a Hash is 64 hex digits"):
        Hash.from_hex("00")


def test_receipt_fields() -> None:
    receipt = Receipt(3, Hash(bytes(32)), 17)
    assert (receipt.seq, receipt.hash, receipt.timestamp) == (3, Hash(bytes(32)), 17)


def test_kind_forbidden_class_is_exactly_the_unicode_categories() -> None:
    # The published class (also the OpenAPI `pattern`) is what unicodedata says: every Cc, Cf,
    # Cs, Zs, Zl, Zp character and everything str.isspace() calls whitespace, nothing else.
    import re
    import sys
    import unicodedata

    from nucleus_actors.record import KIND_FORBIDDEN

    if unicodedata.unidata_version != "14.0.0":  # pragma: no cover - other Pythons
        pytest.skip(f"the class was generated from Unicode 14.0, this Python has {sys.version}")
    bad = re.compile(f"[{KIND_FORBIDDEN}]")
    for code in range(0x110000):
        char = chr(code)
        expected = unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}
        expected = expected or char.isspace()
        assert (bad.match(char) is not None) is expected, hex(code)


def test_printable_kinds_are_accepted() -> None:
    for kind in ("order.created", "commande.créée", "注文", "😀.emoji", "a-b_c:d/e", "\ue000"):
        assert Record(kind, None).kind == kind


def test_error_messages_and_paths_are_printable_and_encodable() -> None:
    # A lone surrogate in a key used to end up raw in the message and the path: printing or
    # encoding the error raised UnicodeEncodeError itself.
    cases = [
        lambda: Record("k", {"\ud800": 1}),
        lambda: Record("k", {"a": {"\udfff\x9b": [1e16]}}),
        lambda: Record("k", ["\ud83d"]),
        lambda: Record("k", 1, {"\ud800": "v"}),
        lambda: Record("k", 1, {"key": "\ud800"}),
        lambda: Record("k\ud800", 1),
        lambda: Record("k", {"line\nbreak\u2028": {1, 2}}),
    ]
    for build in cases:
        with pytest.raises(InvalidRecord) as info:
            build()
        text = str(info.value)
        text.encode("utf-8")
        assert text.isprintable(), text
        assert info.value.path is not None
        assert info.value.path.isprintable(), info.value.path
    with pytest.raises(InvalidRecord) as info:
        Record("k", {"\ud800": 1})
    assert info.value.path == '$.payload["\\ud800"]'


def test_meta_is_immutable() -> None:
    record = Record("k", 1, {"a": "1"})
    with pytest.raises(TypeError, match="immutable"):
        record.meta["k"] = "v"  # type: ignore[index]
    for mutate in (
        lambda m: m.update(b="2"),
        lambda m: m.pop("a"),
        lambda m: m.clear(),
        lambda m: m.setdefault("b", "2"),
        lambda m: m.popitem(),
        lambda m: m.__delitem__("a"),
    ):
        with pytest.raises(TypeError, match="immutable"):
            mutate(record.meta)
    assert record.meta == {"a": "1"}
    assert record == Record("k", 1, {"a": "1"})
    assert record.with_meta(b="2").meta == {"a": "1", "b": "2"}


def test_records_hash_and_compare_by_canonical_bytes() -> None:
    a = Record("k", {"x": [1, 2.0]}, {"m": "v"})
    b = Record("k", {"x": (1, 2)}, {"m": "v"})
    assert a == b  # same canonical bytes
    assert hash(a) == hash(b)
    assert Record("k", True) != Record("k", 1)  # `true` is not `1`
    assert Record("k", 1) != Record("k", 1).replace(seq=0, timestamp=5)
    committed = Record("k", 1, seq=3, timestamp=9)
    assert {committed, Record("k", 1, seq=3, timestamp=9)} == {committed}
    assert len({Record("k", i) for i in range(10)}) == 10
    assert Record("k", 1) != ("k", 1)


def test_records_pickle_and_copy_as_values() -> None:
    import copy
    import pickle

    record = Record("k", {"a": [1, "é"]}, {"trace": "t"}, seq=4, timestamp=7)
    for clone in (pickle.loads(pickle.dumps(record)), copy.deepcopy(record), copy.copy(record)):
        assert clone == record
        assert clone.meta == {"trace": "t"}
        with pytest.raises(TypeError):
            clone.meta["x"] = "y"  # type: ignore[index]


def test_the_append_paths_constructors_build_what_the_dataclasses_build() -> None:
    from nucleus_actors.record import Entry, Receipt, committed_entries, receipts_of

    records = [Record("k", {"n": n}, meta={"m": "v"}) for n in range(3)]
    heads = [Hash(bytes([n]) * 32) for n in range(3)]
    datas = [b"d%d" % n for n in range(3)]
    fast = committed_entries(records, 7, 1234, heads, datas)
    slow = [Entry(7 + n, records[n]._commit(7 + n, 1234), heads[n], datas[n]) for n in range(3)]
    for a, b in zip(fast, slow, strict=True):
        assert type(a) is Entry
        assert (a.seq, a.hash, a.canonical, a.timestamp) == (b.seq, b.hash, b.canonical, 1234)
        for name in ("kind", "payload", "meta", "seq", "timestamp", "_body"):
            assert getattr(a.record, name) == getattr(b.record, name)
        assert a.record.committed
    assert receipts_of(fast, 1234) == [Receipt(7 + n, heads[n], 1234) for n in range(3)]

"""Values of the ledger: `Record`, `Hash`, `Entry`, `Receipt`.

A `Record` is validated when it is built: a bad kind, meta or payload raises `InvalidRecord`
naming the rule and the JSON path of the offending value. Its canonical JSON body is computed
once, at construction, and reused for the size check and the hash: records are values, and a
payload must not be mutated once it is in a record (build a new one with `replace`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NoReturn

from . import _jcs
from .errors import InvalidRecord

__all__ = ["MAX_KIND_LENGTH", "Entry", "Hash", "Receipt", "Record"]

MAX_KIND_LENGTH: Final = 256
"""Longest `Record.kind` accepted, in characters."""

# A kind is a short identifier such as "order.created": printable, no whitespace. Refused:
# every character of Unicode categories Cc (C0 and C1 controls), Cf (format: U+00AD, U+200B,
# U+FEFF, ...), Cs (lone surrogates), Zs/Zl/Zp (separators) and whatever `str.isspace()` calls
# whitespace. Generated from unicodedata 14.0 (tests/unit/test_record.py regenerates it and
# compares); the OpenAPI schema publishes the same class as the `pattern` of `kind`.
KIND_FORBIDDEN: Final = (
    r"\u0000-\u0020\u007f-\u00a0\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891"
    r"\u08e2\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000"
    r"\ud800-\udfff\ufeff\ufff9-\ufffb"
    r"\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    r"\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
"""The characters a `Record.kind` may not hold: the body of a regex character class, written
with `\\uXXXX` / `\\UXXXXXXXX` escapes (Python `re` syntax)."""
_KIND_BAD: Final = re.compile(f"[{KIND_FORBIDDEN}]")


class Hash(bytes):
    """A 32-byte blake3 digest; compares and hashes as bytes, prints as lowercase hex."""

    __slots__ = ()

    SIZE: Final = 32

    def __new__(cls, value: bytes | bytearray | memoryview) -> Hash:
        data = bytes(value)
        if len(data) != 32:
            raise ValueError(f"a Hash is 32 bytes, got {len(data)}")
        return super().__new__(cls, data)

    @classmethod
    def from_hex(cls, text: str) -> Hash:
        """Parse 64 hex digits (either case).

        Raises:
            ValueError: `text` is not 64 hex digits.
        """
        if not isinstance(text, str) or len(text) != 64:
            raise ValueError(f"a Hash is 64 hex digits, got {text!r}")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ValueError(f"a Hash is 64 hex digits, got {text!r}") from None

    def __repr__(self) -> str:
        return f"Hash.from_hex('{self.hex()}')"

    def __str__(self) -> str:
        return self.hex()


_KINDS_SEEN: set[str] = set()  # kinds already validated (kinds repeat: skip the regex)
_KINDS_SEEN_MAX = 4096


def _check_kind(kind: object) -> str:
    if type(kind) is str and kind in _KINDS_SEEN:
        return kind
    if not isinstance(kind, str):
        raise InvalidRecord(f"kind must be a str, got {type(kind).__name__}", path="$.kind")
    if not kind:
        raise InvalidRecord("kind must not be empty", path="$.kind")
    if len(kind) > MAX_KIND_LENGTH:
        raise InvalidRecord(
            f"kind is {len(kind)} characters, the limit is {MAX_KIND_LENGTH}", path="$.kind"
        )
    bad = _KIND_BAD.search(kind)
    if bad is not None:
        raise InvalidRecord(
            f"kind {kind!r} contains whitespace, a control or another non-printable character "
            f"(U+{ord(bad.group()):04X} at index {bad.start()})",
            path="$.kind",
        )
    if type(kind) is str:
        if len(_KINDS_SEEN) >= _KINDS_SEEN_MAX:
            _KINDS_SEEN.clear()
        _KINDS_SEEN.add(kind)
    return kind


class _FrozenMeta(dict[str, str]):
    """`Record.meta`: an immutable str-to-str mapping (a dict that refuses every change).

    A dict subclass so that it serialises (json, rfc8785) and compares like the dict it was
    built from; hashable, since it cannot change.
    """

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            "Record.meta is immutable: build a new record with with_meta() or replace()"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenMeta, (dict(self),))

    def __copy__(self) -> _FrozenMeta:
        return self

    def __deepcopy__(self, memo: object) -> _FrozenMeta:
        return self

    def __repr__(self) -> str:
        return dict.__repr__(self)


_EMPTY_META: Final = _FrozenMeta()


def _check_meta(meta: object) -> tuple[_FrozenMeta, bool]:
    if type(meta) is _FrozenMeta:
        return meta, all(key.isascii() for key in meta)
    if type(meta) is dict and not meta:
        return _EMPTY_META, True
    if not isinstance(meta, Mapping):
        raise InvalidRecord(
            f"meta must be a mapping of str to str, got {type(meta).__name__}", path="$.meta"
        )
    out: dict[str, str] = {}
    fast = True
    for key, value in meta.items():
        if not isinstance(key, str) or not key:
            raise InvalidRecord(f"meta key {key!r} must be a non-empty str", path="$.meta")
        if not isinstance(value, str):
            raise InvalidRecord(
                f"meta value must be a str, got {type(value).__name__} {value!r}",
                path=_jcs.json_path("$.meta", [key]),
            )
        if not key.isascii():
            fast = False
        out[key] = value
    return _FrozenMeta(out), fast


def _check_position(name: str, value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= _jcs.MAX_SAFE_INTEGER:
        raise InvalidRecord(
            f"{name} must be None or an int in [0, 2**53-1], got {value!r}", path=f"$.{name}"
        )
    return value


def _encode_body(kind: str, meta: dict[str, str], payload: Any, fast: bool) -> bytes:
    # See committed_bytes: the body is the canonical record without seq/ts and without its
    # closing brace.
    body = {"kind": kind, "meta": meta, "payload": payload}
    return _jcs.dumps(body, fast)[:-1]


# -- the committed-bytes layout (written here and nowhere else) -------------------------------
_SEQ_MARKER: Final = b',"seq":'


def committed_bytes(body: bytes, seq: int, timestamp: int) -> bytes:
    """The canonical bytes of a committed record from its body (`Record._body`), seq and ts.

    The committed record is `{"kind", "meta", "payload", "seq", "ts"}`; "seq" and "ts" sort
    after every other key, so its RFC 8785 form is the canonical `{"kind","meta","payload"}`
    minus its closing brace (the body, computed once per record) followed by
    `,"seq":N,"ts":T}`. The size check before commit uses `len(committed_bytes(b"", ...))`.
    """
    return b'%s,"seq":%d,"ts":%d}' % (body, seq, timestamp)


def body_of(canonical: bytes) -> bytes:
    """The body part of a committed record's canonical bytes (the inverse of
    `committed_bytes`); `b""` when the bytes do not have that layout."""
    marker = canonical.rfind(_SEQ_MARKER)
    return canonical[:marker] if marker > 0 else b""


_NO_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False, init=False)
class Record:
    """One ledger record: a kind, a JSON payload and string metadata.

    A record handed to `append` has `seq` and `timestamp` of `None`; the committed copy the
    ledger stores (and gives to `after_append`, `get`, `read`) carries both.

    Records are values. `meta` is an immutable mapping (a copy of what was given). The
    payload is a value too: the record keeps the object it was given (no copy, for speed),
    so never mutate it afterwards; build a new record with `replace` instead. Equality and
    `hash()` follow the canonical JSON (the bytes that get hashed) plus `seq` and
    `timestamp`: `Record("k", 1.0) == Record("k", 1)` and `Record("k", [1]) == Record("k",
    (1,))` (same bytes), while `Record("k", True) != Record("k", 1)` (`true` is not `1`).

    Raises:
        InvalidRecord: on construction, for an empty, over-long or non-printable `kind`, a
            payload that is not JSON (non-str keys, NaN/inf, integers beyond +/-(2**53-1),
            other types, nesting deeper than 64), or meta that is not str to str.
    """

    kind: str
    """What happened, e.g. `"order.created"`: 1..256 printable characters, no whitespace."""
    payload: Any
    """A JSON value: dict (str keys), list/tuple, str, int (|i| <= 2**53-1), finite float,
    bool or None. Tuples are stored as arrays."""
    meta: Mapping[str, str] = field(default_factory=dict)
    """String metadata (e.g. a trace id), an immutable mapping; covered by the hash."""
    seq: int | None = field(default=None, kw_only=True)
    """Position in the ledger, from 0; set on committed records."""
    timestamp: int | None = field(default=None, kw_only=True)
    """Commit time, UTC microseconds since the Unix epoch; set on committed records."""
    _body: bytes = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        kind: str,
        payload: Any,
        meta: Mapping[str, str] = _NO_META,
        *,
        seq: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        # Hand-written (not the dataclass one): every field is validated, then set once.
        kind = _check_kind(kind)
        meta_dict, meta_fast = _check_meta({} if meta is _NO_META else meta)
        payload_fast = _jcs.walk(payload, "$.payload")
        if seq is not None:
            _check_position("seq", seq)
        if timestamp is not None:
            _check_position("timestamp", timestamp)
        set_ = object.__setattr__
        set_(self, "kind", kind)
        set_(self, "payload", payload)
        set_(self, "meta", meta_dict)
        set_(self, "seq", seq)
        set_(self, "timestamp", timestamp)
        set_(self, "_body", _encode_body(kind, meta_dict, payload, meta_fast and payload_fast))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (
            self._body == other._body
            and self.seq == other.seq
            and self.timestamp == other.timestamp
        )

    def __hash__(self) -> int:
        return hash((self._body, self.seq, self.timestamp))

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            Record._trusted,
            (self.kind, self.payload, dict(self.meta), self.seq, self.timestamp, self._body),
        )

    def replace(self, **fields: Any) -> Record:
        """A copy with `fields` changed (kind, payload, meta, seq, timestamp), re-validated."""
        unknown = set(fields) - {"kind", "payload", "meta", "seq", "timestamp"}
        if unknown:
            raise TypeError(f"Record.replace() got unknown fields: {sorted(unknown)}")
        return Record(
            fields.get("kind", self.kind),
            fields.get("payload", self.payload),
            fields.get("meta", self.meta),
            seq=fields.get("seq", self.seq),
            timestamp=fields.get("timestamp", self.timestamp),
        )

    def with_meta(self, items: Mapping[str, str] | None = None, /, **more: str) -> Record:
        """A copy whose meta has `items` and `more` added (overriding keys already present)."""
        meta = dict(self.meta)
        if items is not None:
            meta.update(items)
        meta.update(more)
        return self.replace(meta=meta)

    @property
    def committed(self) -> bool:
        """True for a record the ledger stored (it has `seq` and `timestamp`)."""
        return self.seq is not None and self.timestamp is not None

    def _commit(self, seq: int, timestamp: int) -> Record:
        """The committed copy (internal: skips re-validation; fields were checked already;
        the append path builds many at once with `committed_entries`)."""
        return Record._trusted(self.kind, self.payload, self.meta, seq, timestamp, self._body)

    @classmethod
    def _trusted(
        cls,
        kind: str,
        payload: Any,
        meta: Mapping[str, str],
        seq: int | None,
        timestamp: int | None,
        body: bytes,
    ) -> Record:
        """Build from already-canonical parts (internal: decoding stored entries)."""
        new = object.__new__(cls)
        set_ = object.__setattr__
        set_(new, "kind", kind)
        set_(new, "payload", payload)
        set_(new, "meta", meta if type(meta) is _FrozenMeta else _FrozenMeta(meta))
        set_(new, "seq", seq)
        set_(new, "timestamp", timestamp)
        set_(new, "_body", body)
        return new


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that an append committed: where it landed and the chain hash at that point."""

    seq: int
    """Position of the entry in the ledger, from 0."""
    hash: Hash
    """`CHAIN_seq`: the chain hash after this entry (see docs/hashing.md)."""
    timestamp: int
    """Commit time, UTC microseconds since the Unix epoch."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry: the committed record, its chain hash and the exact bytes hashed."""

    seq: int
    """Position of the entry in the ledger, from 0."""
    record: Record
    """The committed record (its `seq` equals this entry's)."""
    hash: Hash
    """`CHAIN_seq`, the chain hash after this entry."""
    canonical: bytes
    """The RFC 8785 canonical JSON bytes that were hashed into `LEAF_seq`."""

    @property
    def timestamp(self) -> int:
        """Commit time of the record, UTC microseconds since the Unix epoch."""
        ts = self.record.timestamp
        assert ts is not None
        return ts

    def receipt(self) -> Receipt:
        """The receipt the appender got for this entry."""
        return Receipt(self.seq, self.hash, self.timestamp)


# -- the append path's constructors ---------------------------------------------------------
# The frozen dataclasses' generated __init__ sets each field through object.__setattr__; the
# append path builds a Record copy, an Entry and a Receipt per record, so it sets the slots
# through their descriptors instead (same objects, about half the cost). Internal.
_new = object.__new__
_RECORD_SLOTS = tuple(
    Record.__dict__[name].__set__
    for name in ("kind", "payload", "meta", "seq", "timestamp", "_body")
)
_ENTRY_SLOTS = tuple(
    Entry.__dict__[name].__set__ for name in ("seq", "record", "hash", "canonical")
)
_RECEIPT_SLOTS = tuple(Receipt.__dict__[name].__set__ for name in ("seq", "hash", "timestamp"))


def committed_entries(
    records: Sequence[Record],
    seq: int,
    timestamp: int,
    heads: Sequence[Hash],
    datas: Sequence[bytes],
) -> list[Entry]:
    """`Entry(seq + i, records[i]._commit(seq + i, timestamp), heads[i], datas[i])` for each
    record (internal: the append path)."""
    set_kind, set_payload, set_meta, set_seq, set_ts, set_body = _RECORD_SLOTS
    set_eseq, set_record, set_hash, set_canonical = _ENTRY_SLOTS
    new = _new
    out: list[Entry] = []
    add = out.append
    for record, head, data in zip(records, heads, datas, strict=True):
        copy = new(Record)
        set_kind(copy, record.kind)
        set_payload(copy, record.payload)
        set_meta(copy, record.meta)
        set_seq(copy, seq)
        set_ts(copy, timestamp)
        set_body(copy, record._body)
        entry = new(Entry)
        set_eseq(entry, seq)
        set_record(entry, copy)
        set_hash(entry, head)
        set_canonical(entry, data)
        add(entry)
        seq += 1
    return out


def receipts_of(entries: Sequence[Entry], timestamp: int) -> list[Receipt]:
    """`Receipt(e.seq, e.hash, timestamp)` for each entry (internal: the append path)."""
    set_seq, set_hash, set_ts = _RECEIPT_SLOTS
    new = _new
    out: list[Receipt] = []
    add = out.append
    for entry in entries:
        receipt = new(Receipt)
        set_seq(receipt, entry.seq)
        set_hash(receipt, entry.hash)
        set_ts(receipt, timestamp)
        add(receipt)
    return out

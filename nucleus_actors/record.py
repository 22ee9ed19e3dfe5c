"""Values of the ledger: `Record`, `Hash`, `Entry`, `Receipt`.

A `Record` is validated when it is built: a bad kind, meta or payload raises `InvalidRecord`
naming the rule and the JSON path of the offending value. Its canonical JSON body is computed
once, at construction, and reused for the size check and the hash: records are values, and a
payload must not be mutated once it is in a record (build a new one with `replace`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from . import _jcs
from .errors import InvalidRecord

__all__ = ["MAX_KIND_LENGTH", "Entry", "Hash", "Receipt", "Record"]

MAX_KIND_LENGTH: Final = 256
"""Longest `Record.kind` accepted, in characters."""

# A kind is a short identifier such as "order.created": printable, no whitespace.
_KIND_RE: Final = re.compile(r"[^\s\x00-\x1f\x7f]+")


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
    if _KIND_RE.fullmatch(kind) is None:
        raise InvalidRecord(
            f"kind {kind!r} contains whitespace or control characters", path="$.kind"
        )
    if type(kind) is str:
        if len(_KINDS_SEEN) >= _KINDS_SEEN_MAX:
            _KINDS_SEEN.clear()
        _KINDS_SEEN.add(kind)
    return kind


def _check_meta(meta: object) -> tuple[dict[str, str], bool]:
    if type(meta) is dict and not meta:
        return {}, True
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
    return out, fast


def _check_position(name: str, value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= _jcs.MAX_SAFE_INTEGER:
        raise InvalidRecord(
            f"{name} must be None or an int in [0, 2**53-1], got {value!r}", path=f"$.{name}"
        )
    return value


def _encode_body(kind: str, meta: dict[str, str], payload: Any, fast: bool) -> bytes:
    # The committed record's canonical bytes are this object with "seq" and "ts" added; both
    # keys sort after "payload", so the canonical form is this encoding minus its closing brace
    # followed by `,"seq":N,"ts":T}` (see hashing.canonical_bytes).
    body = {"kind": kind, "meta": meta, "payload": payload}
    return _jcs.dumps(body, fast)[:-1]


_NO_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=True, init=False)
class Record:
    """One ledger record: a kind, a JSON payload and string metadata.

    A record handed to `append` has `seq` and `timestamp` of `None`; the committed copy the
    ledger stores (and gives to `after_append`, `get`, `read`) carries both.

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
    """String metadata (e.g. a trace id); covered by the hash like everything else."""
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
        """The committed copy (internal: skips re-validation; fields were checked already)."""
        new = object.__new__(Record)
        set_ = object.__setattr__
        set_(new, "kind", self.kind)
        set_(new, "payload", self.payload)
        set_(new, "meta", self.meta)
        set_(new, "seq", seq)
        set_(new, "timestamp", timestamp)
        set_(new, "_body", self._body)
        return new

    @classmethod
    def _trusted(
        cls, kind: str, payload: Any, meta: dict[str, str], seq: int, timestamp: int, body: bytes
    ) -> Record:
        """Build from already-canonical parts (internal: decoding stored entries)."""
        new = object.__new__(cls)
        set_ = object.__setattr__
        set_(new, "kind", kind)
        set_(new, "payload", payload)
        set_(new, "meta", meta)
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

"""The ledger's byte-level hashing: canonical bytes, leaf, chain and genesis hashes.

```
bytes_i   = RFC 8785 (JCS) canonical JSON of the committed record
            {"kind": ..., "meta": {...}, "payload": ..., "seq": i, "ts": <int, UTC microseconds>}
LEAF_i    = blake3(0x00 || bytes_i)
CHAIN_-1  = blake3(0x03 || utf8(ledger_id))            # genesis, bound to the ledger id
CHAIN_i   = blake3(0x02 || CHAIN_i-1 || u64be(i) || LEAF_i)
NODE(l,r) = blake3(0x01 || l || r)                      # RFC 6962 tree shape over LEAF_i
```

These functions are public so that storage backends and third parties reuse them; docs/hashing.md
has test vectors anyone can check with any blake3 and any JCS implementation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

from blake3 import blake3

from . import proofs as _proofs
from .errors import IntegrityError, InvalidRecord
from .record import Entry, Hash, Record, body_of, committed_bytes

__all__ = [
    "ChainVerifier",
    "canonical_bytes",
    "chain_hash",
    "chain_step",
    "chain_step_leaf",
    "chain_steps",
    "decode_entry",
    "genesis",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_entries",
]

_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"
_CHAIN: Final = b"\x02"
_GENESIS: Final = b"\x03"
_U64_MAX: Final = 2**64 - 1
_new_hash: Final = bytes.__new__  # a blake3 digest is 32 bytes: skip Hash's validating init


def canonical_bytes(record: Record) -> bytes:
    """The exact bytes hashed for a committed record (`seq` and `timestamp` set).

    Raises:
        InvalidRecord: the record is not committed (no `seq` or no `timestamp`).
    """
    if record.seq is None or record.timestamp is None:
        raise InvalidRecord(
            "canonical bytes need a committed record (seq and timestamp set), "
            f"got seq={record.seq!r} timestamp={record.timestamp!r}"
        )
    return committed_bytes(record._body, record.seq, record.timestamp)


def genesis(ledger_id: str) -> Hash:
    """`CHAIN_-1`: the head of an empty ledger, bound to its id."""
    return _new_hash(Hash, blake3(_GENESIS + ledger_id.encode("utf-8")).digest())


def leaf_hash(data: bytes) -> Hash:
    """`LEAF_i = blake3(0x00 || bytes_i)` of an entry's canonical bytes."""
    return _new_hash(Hash, blake3(_LEAF + data).digest())


def chain_hash(prev: bytes, seq: int, leaf: bytes) -> Hash:
    """`CHAIN_i = blake3(0x02 || CHAIN_i-1 || u64be(i) || LEAF_i)`."""
    if not 0 <= seq <= _U64_MAX:
        raise ValueError(f"seq must fit an unsigned 64-bit integer, got {seq}")
    return _new_hash(Hash, blake3(_CHAIN + prev + seq.to_bytes(8, "big") + leaf).digest())


def chain_step(prev: bytes, seq: int, data: bytes) -> Hash:
    """`CHAIN_seq` from `CHAIN_seq-1` and the entry's canonical bytes (leaf, then link).

    The same as `chain_hash(prev, seq, leaf_hash(data))`, in one call: what the append path
    and verification run for every entry.
    """
    leaf = blake3(_LEAF + data).digest()
    return _new_hash(Hash, blake3(_CHAIN + prev + seq.to_bytes(8, "big") + leaf).digest())


def chain_step_leaf(prev: bytes, seq: int, data: bytes) -> tuple[bytes, Hash]:
    """`(LEAF_seq, CHAIN_seq)` from `CHAIN_seq-1` and the entry's canonical bytes.

    `chain_step` that also returns the leaf hash (the Merkle tree's leaf), in one call.
    """
    leaf = blake3(_LEAF + data).digest()
    return leaf, _new_hash(Hash, blake3(_CHAIN + prev + seq.to_bytes(8, "big") + leaf).digest())


def chain_steps(
    prev: bytes, seq: int, datas: Sequence[bytes], leaves: list[bytes] | None
) -> list[Hash]:
    """`CHAIN_seq .. CHAIN_seq+n-1` of consecutive entries' canonical bytes, from `CHAIN_seq-1`.

    `chain_step` over a run of entries in one loop (the append path's group commit); their
    `LEAF` hashes are appended to `leaves` unless it is None.
    """
    heads: list[Hash] = []
    add_head = heads.append
    add_leaf = leaves.append if leaves is not None else None
    new_hash, hash_type, leaf_tag, chain_tag = _new_hash, Hash, _LEAF, _CHAIN
    hasher = blake3()  # one hasher, reset per hash: cheaper than a new one each time
    reset, update, digest = hasher.reset, hasher.update, hasher.digest
    head = prev
    for data in datas:
        reset()
        update(leaf_tag + data)
        leaf = digest()
        if add_leaf is not None:
            add_leaf(leaf)
        reset()
        update(chain_tag + head + seq.to_bytes(8, "big") + leaf)
        head = new_hash(hash_type, digest())
        add_head(head)
        seq += 1
    return heads


def node_hash(left: bytes, right: bytes) -> Hash:
    """`NODE(l, r) = blake3(0x01 || l || r)`, an interior node of the RFC 6962 tree."""
    return Hash(blake3(_NODE + left + right).digest())


def merkle_root(leaves: Sequence[bytes]) -> Hash:
    """Root of the RFC 6962 (section 2.1) tree over `leaves` (LEAF hashes, in seq order).

    The tree splits at the largest power of two smaller than the number of leaves. The root of
    no leaves is `blake3()` of nothing, as in RFC 6962. The same as
    `nucleus_actors.proofs.root(proofs.BLAKE3, leaves)`, which builds and checks proofs too.
    """
    return _proofs.root(_proofs.BLAKE3, leaves)


def _record_from(seq: int, obj: Any, body: bytes) -> Record:
    if not isinstance(obj, dict) or set(obj) != {"kind", "meta", "payload", "seq", "ts"}:
        raise IntegrityError(
            f"entry {seq}: canonical bytes are not a record object "
            '{"kind","meta","payload","seq","ts"}',
            seq=seq,
        )
    kind, meta, ts = obj["kind"], obj["meta"], obj["ts"]
    if obj["seq"] != seq or type(obj["seq"]) is not int:
        raise IntegrityError(
            f"entry {seq}: canonical bytes carry seq {obj['seq']!r}, stored at {seq}", seq=seq
        )
    if (
        not isinstance(kind, str)
        or not isinstance(meta, dict)
        or type(ts) is not int
        or not all(isinstance(v, str) for v in meta.values())
    ):
        raise IntegrityError(f"entry {seq}: canonical bytes hold an invalid record", seq=seq)
    return Record._trusted(kind, obj["payload"], meta, seq, ts, body)


def decode_entry(seq: int, canonical: bytes, hash: bytes) -> Entry:
    """Rebuild a stored entry from its canonical bytes and chain hash (for storage backends).

    Decoding does not re-serialise and does not verify the chain (see `ChainVerifier`); it
    checks that the bytes are a record object carrying this `seq`.

    Raises:
        IntegrityError: the bytes cannot be decoded into a record stored at `seq`, or the hash
            is not 32 bytes.
    """
    try:
        obj = json.loads(canonical)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"entry {seq}: canonical bytes are not JSON ({exc})", seq=seq) from exc
    record = _record_from(seq, obj, body_of(canonical))
    try:
        digest = Hash(hash)
    except ValueError as exc:
        raise IntegrityError(f"entry {seq}: stored hash is not 32 bytes", seq=seq) from exc
    return Entry(seq, record, digest, bytes(canonical))


class ChainVerifier:
    """Incremental chain check: feed entries in seq order, get the verified head.

    Every entry is checked by recomputing its leaf from the stored canonical bytes (never by
    re-serialising the record) and its chain hash from the previous one.
    """

    __slots__ = ("head", "length")

    def __init__(self, prev: Hash, start: int = 0) -> None:
        self.head: Hash = prev
        """Chain hash after the last entry fed (the `prev` given when none was)."""
        self.length: int = start
        """Seq expected next: the number of entries verified plus `start`."""

    def feed(self, entry: Entry) -> Hash:
        """Check one entry (it must be the next seq); return its chain hash.

        Raises:
            IntegrityError: naming the entry's seq, if it is out of order, its record does not
                match its canonical bytes, or its chain hash does not match.
        """
        seq = self.length
        if entry.seq != seq:
            raise IntegrityError(f"expected entry {seq}, storage returned {entry.seq}", seq=seq)
        if entry.record.seq != seq:
            raise IntegrityError(f"entry {seq}: its record carries seq {entry.record.seq}", seq=seq)
        expected = chain_step(self.head, seq, entry.canonical)
        if expected != entry.hash:
            raise IntegrityError(
                f"entry {seq}: chain hash mismatch (stored {bytes(entry.hash).hex()}, "
                f"recomputed {expected.hex()})",
                seq=seq,
            )
        self.head = expected
        self.length = seq + 1
        return expected


def verify_entries(entries: Iterable[Entry], *, prev: Hash, start: int = 0) -> Hash:
    """Verify a run of entries that follows `prev` at seq `start`; return the resulting head.

    Raises:
        IntegrityError: naming the seq of the first entry that does not verify.
    """
    verifier = ChainVerifier(prev, start)
    for entry in entries:
        verifier.feed(entry)
    return verifier.head

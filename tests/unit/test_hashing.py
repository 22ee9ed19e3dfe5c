"""Hash chain: documented vectors, genesis binding, tamper detection naming the seq."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from blake3 import blake3

from nucleus_actors import Entry, Hash, IntegrityError, InvalidRecord, Record
from nucleus_actors.hashing import (
    ChainVerifier,
    canonical_bytes,
    chain_hash,
    chain_step,
    decode_entry,
    genesis,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_entries,
)

DOC = Path(__file__).parents[2] / "docs" / "hashing.md"


def _doc_vectors() -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- vectors:begin -->\n```json\n(.*?)```", text, re.S)
    assert block is not None, "docs/hashing.md lost its vectors block"
    vectors: list[dict[str, Any]] = json.loads(block.group(1))
    return vectors


def test_doc_has_at_least_five_vectors() -> None:
    assert len(_doc_vectors()) >= 5


@pytest.mark.parametrize(
    "vector", _doc_vectors(), ids=lambda v: f"{v['ledger_id']}-{v['record']['seq']}"
)
def test_doc_vector(vector: dict[str, Any]) -> None:
    raw = vector["record"]
    record = Record(raw["kind"], raw["payload"], raw["meta"], seq=raw["seq"], timestamp=raw["ts"])
    data = canonical_bytes(record)
    assert data.hex() == vector["canonical_hex"]
    # Independent computation with only blake3 + rfc8785, as the doc tells third parties.
    assert rfc8785.dumps(raw) == data
    assert blake3(b"\x00" + data).hexdigest() == vector["leaf"]
    assert leaf_hash(data).hex() == vector["leaf"]


def test_doc_chain_and_merkle_root() -> None:
    vectors = _doc_vectors()
    orders = [v for v in vectors if v["ledger_id"] == "orders"]
    prev = genesis("orders")
    assert prev.hex() == blake3(b"\x03orders").hexdigest()
    for v in orders:
        prev = chain_hash(prev, v["record"]["seq"], Hash.from_hex(v["leaf"]))
        assert prev.hex() == v["chain"]
    root = merkle_root([Hash.from_hex(v["leaf"]) for v in orders])
    assert root.hex() in DOC.read_text(encoding="utf-8")
    audit = next(v for v in vectors if v["ledger_id"] == "audit")
    assert chain_hash(genesis("audit"), 0, Hash.from_hex(audit["leaf"])).hex() == audit["chain"]


def test_doc_script_verifies_the_vectors() -> None:
    text = DOC.read_text(encoding="utf-8")
    script = re.search(r"## Verify a chain.*?```python\n(.*?)```", text, re.S)
    assert script is not None
    assert len([line for line in script.group(1).splitlines() if line.strip()]) <= 10
    namespace: dict[str, Any] = {}
    exec(script.group(1), namespace)
    orders = [v for v in _doc_vectors() if v["ledger_id"] == "orders"]
    head = namespace["verify"](
        "orders", [v["record"] for v in orders], [v["chain"] for v in orders]
    )
    assert head == orders[-1]["chain"]
    bad = [v["chain"] for v in orders]
    bad[1] = "00" * 32
    with pytest.raises(SystemExit, match="chain breaks at seq 1"):
        namespace["verify"]("orders", [v["record"] for v in orders], bad)


def test_merkle_shapes() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(3)]
    assert merkle_root(leaves[:1]) == leaves[0]
    assert merkle_root(leaves[:2]) == node_hash(leaves[0], leaves[1])
    assert merkle_root(leaves) == node_hash(node_hash(leaves[0], leaves[1]), leaves[2])
    assert merkle_root([]) == Hash(blake3(b"").digest())


def test_canonical_bytes_need_a_committed_record() -> None:
    with pytest.raises(InvalidRecord, match=r"need a committed record .* seq=None"):
        canonical_bytes(Record("k", 1))


def test_chain_hash_rejects_out_of_range_seq() -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        chain_hash(genesis("x"), -1, genesis("x"))


def _entries(ledger_id: str, n: int) -> list[Entry]:
    prev = genesis(ledger_id)
    out = []
    for seq in range(n):
        record = Record("k", {"n": seq}, seq=seq, timestamp=1000 + seq)
        data = canonical_bytes(record)
        prev = chain_hash(prev, seq, leaf_hash(data))
        out.append(Entry(seq, record, prev, data))
    return out


def test_genesis_binding_same_records_different_ledgers() -> None:
    a, b = _entries("alpha", 3), _entries("beta", 3)
    assert [e.canonical for e in a] == [e.canonical for e in b]
    assert all(x.hash != y.hash for x, y in zip(a, b, strict=True))
    with pytest.raises(IntegrityError, match="entry 0: chain hash mismatch") as info:
        verify_entries(a, prev=genesis("beta"))
    assert info.value.seq == 0


def test_verify_entries_returns_head() -> None:
    entries = _entries("alpha", 5)
    assert verify_entries(entries, prev=genesis("alpha")) == entries[-1].hash
    verifier = ChainVerifier(entries[1].hash, start=2)
    for entry in entries[2:]:
        verifier.feed(entry)
    assert (verifier.length, verifier.head) == (5, entries[-1].hash)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _replaced(entries: list[Entry], seq: int, canonical: bytes, digest: bytes) -> Iterator[Entry]:
    """The entries, with entry `seq` decoded lazily from tampered bytes (as a backend would)."""
    for entry in entries:
        yield decode_entry(seq, canonical, digest) if entry.seq == seq else entry


@pytest.mark.parametrize("victim", range(5))
def test_any_changed_byte_is_detected_at_its_seq(victim: int) -> None:
    """Flip every byte of every stored field of one entry: verification names that seq."""
    entries = _entries("alpha", 5)
    target = entries[victim]
    for index in range(len(target.canonical)):
        tampered = _flip(target.canonical, index)
        with pytest.raises(IntegrityError) as info:
            verify_entries(_replaced(entries, victim, tampered, target.hash), prev=genesis("alpha"))
        assert info.value.seq == victim, index
    for index in range(32):
        rows = _replaced(entries, victim, target.canonical, _flip(target.hash, index))
        with pytest.raises(IntegrityError, match=f"entry {victim}: chain hash mismatch"):
            verify_entries(rows, prev=genesis("alpha"))


def test_decode_entry_rejects_garbage_and_wrong_seq() -> None:
    entry = _entries("alpha", 1)[0]
    with pytest.raises(IntegrityError, match="entry 3: canonical bytes are not JSON") as info:
        decode_entry(3, b"{not json", entry.hash)
    assert info.value.seq == 3
    with pytest.raises(IntegrityError, match="entry 1: canonical bytes carry seq 0"):
        decode_entry(1, entry.canonical, entry.hash)
    with pytest.raises(IntegrityError, match="not a record object"):
        decode_entry(0, b'{"a":1}', entry.hash)
    with pytest.raises(IntegrityError, match="stored hash is not 32 bytes"):
        decode_entry(0, entry.canonical, b"short")
    decoded = decode_entry(0, entry.canonical, entry.hash)
    assert decoded == entry
    assert canonical_bytes(decoded.record) == entry.canonical


def test_verifier_rejects_out_of_order() -> None:
    entries = _entries("alpha", 3)
    with pytest.raises(IntegrityError, match="expected entry 0, storage returned 1"):
        verify_entries(entries[1:], prev=genesis("alpha"))


def test_chain_step_is_leaf_then_link() -> None:
    prev = genesis("x")
    for seq, data in enumerate([b"{}", b'{"a":1}', b"x" * 1000]):
        assert chain_step(prev, seq, data) == chain_hash(prev, seq, leaf_hash(data))
        assert type(chain_step(prev, seq, data)) is Hash
        prev = chain_step(prev, seq, data)

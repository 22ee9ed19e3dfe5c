"""Canonical encoding + chain hashing throughput, next to raw blake3 on the same bytes.

Run: `python benchmarks/bench_hashing.py`. All figures come from one run on this machine:

  raw blake3 (leaf + link)   blake3 of the same canonical bytes, the two hashes per entry only
  chain_step                 nucleus_actors.hashing.chain_step (LEAF + CHAIN, Hash values)
  canonical: fast path       Record construction: validation walk + json.dumps JCS fast path
  canonical: rfc8785         the same records through rfc8785.dumps (the reference encoder)
  encode + chain             Record construction + committed bytes + chain_step per entry
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import rfc8785
from blake3 import blake3

from nucleus_actors import Record
from nucleus_actors.hashing import canonical_bytes, chain_step, genesis

N = 50_000


def _payload(i: int) -> dict[str, Any]:
    return {"order": i, "customer": "c-17", "items": ["apple", "pear"], "paid": True}


def _rate(fn: Callable[[], None], n: int = N, repeat: int = 3) -> float:
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    payloads = [_payload(i) for i in range(N)]
    records = [Record("order.created", p) for p in payloads]
    datas = [canonical_bytes(r._commit(i, 1_700_000_000_000_000)) for i, r in enumerate(records)]
    head = bytes(genesis("bench"))

    def raw_blake3() -> None:
        prev = head
        for seq, data in enumerate(datas):
            leaf = blake3(b"\x00" + data).digest()
            prev = blake3(b"\x02" + prev + seq.to_bytes(8, "big") + leaf).digest()

    def ours_chain() -> None:
        prev = head
        for seq, data in enumerate(datas):
            prev = chain_step(prev, seq, data)

    def encode_fast() -> None:
        for p in payloads:
            Record("order.created", p)

    def encode_rfc8785() -> None:
        for p in payloads:
            rfc8785.dumps({"kind": "order.created", "meta": {}, "payload": p})

    def encode_and_chain() -> None:
        prev = head
        for seq, p in enumerate(payloads):
            record = Record("order.created", p)._commit(seq, 1_700_000_000_000_000)
            prev = chain_step(prev, seq, canonical_bytes(record))

    raw = _rate(raw_blake3)
    chain = _rate(ours_chain)
    rows = [
        ("raw blake3 (leaf + link)", raw, ""),
        ("chain_step", chain, f"{chain / raw:.2f}x raw blake3"),
        ("canonical: fast path (Record)", _rate(encode_fast), ""),
        ("canonical: rfc8785.dumps", _rate(encode_rfc8785), ""),
        ("encode + chain", _rate(encode_and_chain), ""),
    ]
    size = sum(len(d) for d in datas) / len(datas)
    print(f"{N:,} records, {size:.0f} canonical bytes each on average")
    width = max(len(r[0]) for r in rows)
    for name, rate, note in rows:
        print(f"{name:<{width}}  {rate:>12,.0f} records/s  {note}")


if __name__ == "__main__":
    main()

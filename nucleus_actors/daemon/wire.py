"""The JSON shapes the daemon writes: receipts and entries (API, SSE, mirror files, export).

No web framework here: the built-in modules (the JSON Lines mirror) and the client share them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from ..record import Entry, Hash, Receipt, Record

__all__ = [
    "ENTRY_FIELDS",
    "committed_json",
    "dumps",
    "entry_json",
    "entry_line",
    "jsonl_line",
    "receipt_json",
]


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    """`{"seq", "hash", "timestamp"}` of a receipt (hash as lowercase hex)."""
    return {"seq": receipt.seq, "hash": receipt.hash.hex(), "timestamp": receipt.timestamp}


def entry_json(entry: Entry) -> dict[str, Any]:
    """`{"seq", "kind", "payload", "meta", "timestamp", "hash"}` of an entry."""
    return committed_json(entry.record, entry.hash)


def committed_json(record: Record, hash: Hash) -> dict[str, Any]:
    """`entry_json` of a committed record (`seq` and `timestamp` set) and its chain hash."""
    return {
        "seq": record.seq,
        "kind": record.kind,
        "payload": record.payload,
        "meta": dict(record.meta),
        "timestamp": record.timestamp,
        "hash": hash.hex(),
    }


def dumps(obj: Any) -> str:
    """Compact JSON text (UTF-8 as is, no NaN or infinities)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


ENTRY_FIELDS: Final = ("seq", "kind", "payload", "meta", "timestamp", "hash")
"""The members of an entry object, in the order JSON Lines files write them."""


def jsonl_line(entry: Mapping[str, Any]) -> bytes:
    """One JSON Lines line (UTF-8, ending in a newline) for an entry object.

    The members come in `ENTRY_FIELDS` order and the keys inside `payload` and `meta` are
    sorted, so an entry has exactly one line whatever order its objects were built in:
    `nucleus export --format jsonl` and the `jsonl-mirror` module write the same bytes.
    """
    parts = [
        f'"{name}":'
        + json.dumps(
            entry[name],
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
            sort_keys=True,
        )
        for name in ENTRY_FIELDS
    ]
    return ("{" + ",".join(parts) + "}\n").encode()


def entry_line(record: Record, hash: Hash) -> bytes:
    """`jsonl_line` of a committed record (`seq` and `timestamp` set) and its chain hash."""
    return jsonl_line(committed_json(record, hash))

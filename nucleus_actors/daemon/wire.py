"""The JSON shapes the daemon writes: receipts and entries (API, SSE, mirror files, export).

No web framework here: the built-in modules (the JSON Lines mirror) and the client share them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Final

from .. import _jcs
from ..hashing import canonical_bytes
from ..record import Entry, Hash, Receipt, Record

__all__ = [
    "ENTRY_FIELDS",
    "EXPORT_FORMAT",
    "committed_json",
    "dumps",
    "entry_json",
    "entry_line",
    "export_header",
    "jsonl_line",
    "parse_export_header",
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
    """One JSON Lines line (UTF-8, ending in a newline) for an entry object as the API serves
    it (what `nucleus tail --format jsonl` prints).

    The members come in `ENTRY_FIELDS` order and the keys inside `payload` and `meta` are
    sorted. Exports and the mirror write `entry_line` instead (canonical numbers, and the
    canonical bytes beside the decoded fields).
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


# -- the export format (docs/hashing.md "Exports"): nucleus export and jsonl-mirror ----------
EXPORT_FORMAT: Final = 1
"""Version of the export format, the value of `nucleus_export` in the header line."""


def export_header(ledger_id: str, start: int, prev: Hash) -> bytes:
    """The first line of an export: `{"nucleus_export":1,"ledger_id","from","prev"}`.

    `from` is the seq of the first entry that follows; `prev` is `CHAIN_{from-1}` in lowercase
    hex (the genesis hash of `ledger_id` when `from` is 0), so that a slice verifies alone.
    """
    header = {
        "nucleus_export": EXPORT_FORMAT,
        "ledger_id": ledger_id,
        "from": start,
        "prev": bytes(prev).hex(),
    }
    return (dumps(header) + "\n").encode()


def parse_export_header(line: bytes | str) -> dict[str, Any] | None:
    """The header object of an export's first line, or None when it is not a header.

    Raises:
        ValueError: a header of an unknown format version, or with missing or bad members.
    """
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "nucleus_export" not in obj:
        return None
    if obj["nucleus_export"] != EXPORT_FORMAT:
        raise ValueError(
            f"export format {obj['nucleus_export']!r} is not supported (this version reads "
            f"{EXPORT_FORMAT})"
        )
    ledger_id, start, prev = obj.get("ledger_id"), obj.get("from"), obj.get("prev")
    if not isinstance(ledger_id, str) or type(start) is not int or start < 0:
        raise ValueError(f"export header needs a string ledger_id and a seq from: {obj!r}")
    Hash.from_hex(prev if isinstance(prev, str) else repr(prev))  # ValueError if not a hash
    return obj


def _canonical_json(value: Any) -> str:
    return _jcs.dumps(value, _jcs.walk(value, "$")).decode("utf-8")


def entry_line(record: Record, hash: Hash) -> bytes:
    """One entry line of an export (and of the `jsonl-mirror` file), with its newline.

    `{"seq","kind","payload","meta","timestamp","hash","canonical"}`: the decoded fields, each
    written in its RFC 8785 form (so `payload` is byte for byte the text inside the canonical
    bytes: `56.0` is written `56`), then `canonical`, the exact bytes hashed into the chain,
    base64 (RFC 4648, with padding). `record` is committed (`seq` and `timestamp` set).
    """
    canonical = canonical_bytes(record)
    kind = _canonical_json(record.kind)
    payload = _canonical_json(record.payload)
    meta = _canonical_json(dict(record.meta))
    encoded = base64.b64encode(canonical).decode("ascii")
    return (
        f'{{"seq":{record.seq},"kind":{kind},"payload":{payload},"meta":{meta},'
        f'"timestamp":{record.timestamp},"hash":"{bytes(hash).hex()}","canonical":"{encoded}"}}\n'
    ).encode()

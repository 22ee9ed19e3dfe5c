"""`nucleus backup` and `nucleus restore`: copies of SQLite ledger files that are known good.

`backup(src, dest)` copies a ledger file with SQLite's online backup API: a consistent
snapshot even while a daemon appends to it (WAL: the copy reads one snapshot and never blocks
the writer), written to `DEST.partial`, verified end to end (`verify_file`), then renamed.

`restore(export, dest)` rebuilds a ledger file from an export (docs/hashing.md "Exports"): a
header line `{"nucleus_export": 1, "ledger_id", "from", "prev"}`, then one entry per line with
its canonical bytes (base64) beside the decoded fields. Every entry's chain hash is recomputed
from its canonical bytes, and the decoded fields must say the same as those bytes. A slice
(`from` > 0) is refused: a ledger file starts at the genesis hash of its id.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from ..errors import IntegrityError, NucleusError, StorageError
from ..hashing import ChainVerifier, decode_entry, genesis
from ..record import Entry, Hash

__all__ = ["BackupError", "Restored", "backup", "restore"]

EXPORT_FORMAT: Final = 1
CHUNK: Final = 1000


class BackupError(NucleusError, ValueError):
    """A backup or restore cannot be made (bad input, a mismatch, a refused slice)."""


@dataclass(frozen=True, slots=True)
class Restored:
    """What a backup or restore wrote."""

    path: Path
    """The file written."""
    ledger_id: str
    """Its ledger id."""
    length: int
    """Number of entries."""
    head: Hash
    """Chain hash of its last entry (the genesis hash if empty)."""


def _partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


async def backup(src: Path, dest: Path) -> Restored:
    """Copy the ledger file `src` to `dest` (online, consistent) and verify the copy.

    Cancellation: the partial copy is removed; `dest` is never half-written.

    Raises:
        BackupError: `src` is not a readable SQLite file, or `dest` exists.
        IntegrityError: the copy does not verify (the source is damaged).
        StorageError: the copy is not a ledger file.
    """
    import trio

    from ..storage import verify_file

    _check_paths(src, dest, "choose a new file (a backup never overwrites)")
    partial = _partial(dest)
    partial.unlink(missing_ok=True)

    def copy() -> None:
        try:
            source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise BackupError(f"cannot open {src}: {exc}") from None
        try:
            target = sqlite3.connect(partial)
            try:
                source.backup(target)  # all pages in one step: one consistent snapshot
            finally:
                target.close()
        except sqlite3.Error as exc:
            raise BackupError(f"cannot copy {src}: {exc}") from None
        finally:
            source.close()

    try:
        await trio.to_thread.run_sync(copy)
        length, head = await verify_file(partial)
        ledger_id = _ledger_id(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return Restored(dest, ledger_id, length, head)


def _check_paths(src: Path | None, dest: Path, why: str) -> None:
    if dest.exists():
        raise BackupError(f"{dest} exists: {why}")
    if src is not None and not src.is_file():
        raise BackupError(f"{src} is not a file")


def _ledger_id(path: Path) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
    return "" if row is None else str(row[0])


def read_header(line: bytes) -> dict[str, Any]:
    """The export header object of `line`.

    Raises:
        BackupError: not a header, an unknown format version, or bad members.
    """
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or "nucleus_export" not in obj:
        raise BackupError(
            "the first line is not an export header "
            '{"nucleus_export": 1, "ledger_id", "from", "prev"} (export it with a current '
            "`nucleus export`)"
        )
    if obj["nucleus_export"] != EXPORT_FORMAT:
        raise BackupError(
            f"export format {obj['nucleus_export']!r} is not supported (this version reads "
            f"{EXPORT_FORMAT})"
        )
    ledger_id, start, prev = obj.get("ledger_id"), obj.get("from"), obj.get("prev")
    if not isinstance(ledger_id, str) or type(start) is not int or not isinstance(prev, str):
        raise BackupError(f"the export header needs ledger_id, from and prev: {obj!r}")
    return obj


def _entries(lines: Iterator[bytes], first: int) -> Iterator[Entry]:
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            seq = obj["seq"]
            canonical = base64.b64decode(obj["canonical"], validate=True)
            entry = decode_entry(seq, canonical, bytes.fromhex(obj["hash"]))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise BackupError(f"line {number}: not an export entry: {exc}") from None
        except IntegrityError as exc:
            raise IntegrityError(f"line {number}: {exc}", seq=exc.seq) from None
        record = entry.record
        decoded = (obj.get("kind"), obj.get("payload"), obj.get("meta"), obj.get("timestamp"))
        if decoded != (record.kind, record.payload, dict(record.meta), record.timestamp):
            raise IntegrityError(
                f"line {number}: entry {seq}'s decoded fields do not match its canonical bytes",
                seq=seq,
            )
        if seq != first + number - 2:
            raise BackupError(f"line {number}: seq {seq} out of order")
        yield entry


async def restore(export: IO[bytes], dest: Path, *, ledger_id: str | None = None) -> Restored:
    """Rebuild a ledger file at `dest` from an export, verifying every hash.

    Args:
        export: the export, read line by line.
        dest: the new ledger file (must not exist).
        ledger_id: when given, the export must be of this ledger.

    Cancellation: the partial file is removed; `dest` is never half-written.

    Raises:
        BackupError: not an export, a ledger id mismatch, a slice, or `dest` exists.
        IntegrityError: an entry does not chain (naming its seq) or does not decode.
    """
    from ..storage import SQLiteStorage, StorageBatch, verify_file

    _check_paths(None, dest, "restore writes a new file")
    lines = iter(export)
    header = read_header(next(lines, b""))
    source_id = header["ledger_id"]
    if ledger_id is not None and ledger_id != source_id:
        raise BackupError(f"the export is of ledger {source_id!r}, not {ledger_id!r} (--ledger)")
    if header["from"] != 0:
        raise BackupError(
            f"the export starts at seq {header['from']} (a slice): a ledger file needs every "
            "entry from seq 0"
        )
    if header["prev"] != genesis(source_id).hex():
        raise IntegrityError(
            f"the export's prev {header['prev']} is not the genesis hash of {source_id!r}", seq=0
        )
    partial = _partial(dest)
    partial.unlink(missing_ok=True)
    storage = SQLiteStorage(partial, durability="normal")
    verifier = ChainVerifier(genesis(source_id), 0)
    try:
        await storage.open(source_id)
        try:
            chunk: list[Entry] = []
            for entry in _entries(lines, 0):
                verifier.feed(entry)
                chunk.append(entry)
                if len(chunk) >= CHUNK:
                    await storage.append(StorageBatch(entries=chunk))
                    chunk = []
            if chunk:
                await storage.append(StorageBatch(entries=chunk))
        finally:
            await storage.close()
        length, head = await verify_file(partial)
        if (length, head) != (verifier.length, verifier.head):  # pragma: no cover - defensive
            raise StorageError(f"{partial} does not hold what was restored")
    except BaseException:
        for leftover in partial.parent.glob(partial.name + "*"):
            leftover.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return Restored(dest, source_id, length, head)

"""The `StorageBackend` protocol every ledger store implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ..record import Entry, Hash

__all__ = ["StorageBackend", "check_range"]


@runtime_checkable
class StorageBackend(Protocol):
    """Where a ledger keeps its entries. The engine is the only writer while it is open.

    The engine groups appends (group commit) and hands each batch to `append` once; a backend
    commits each batch atomically and durably. Reads may run concurrently with appends and see a
    prefix of the ledger.
    """

    async def open(self, ledger_id: str) -> None:
        """Create the store for `ledger_id`, or check an existing one belongs to it.

        Raises:
            StorageError: the store belongs to another ledger, is held by another writer, has
                an unknown format, or cannot be opened.
        """
        ...

    async def head(self) -> tuple[int, Hash]:
        """`(length, head hash)`; `(0, genesis(ledger_id))` for an empty ledger."""
        ...

    async def append(self, entries: Sequence[Entry]) -> None:
        """Store `entries` atomically: all or none, durable on return.

        `entries[0].seq` equals the current length and seqs are contiguous.

        Raises:
            StorageError: nothing of the batch was stored.
        """
        ...

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries with `start <= seq < stop` in seq order (`stop=None`: to the head).

        Raises:
            IntegrityError: a stored entry cannot be decoded (names its seq).
        """
        ...

    async def close(self) -> None:
        """Release the store (idempotent)."""
        ...


def check_range(start: int, stop: int | None) -> None:
    """Validate `read` arguments.

    Raises:
        ValueError: `start` is not an int >= 0, or `stop` is neither None nor an int >= start.
    """
    if type(start) is not int or start < 0:
        raise ValueError(f"read start must be an int >= 0, got {start!r}")
    if stop is not None and (type(stop) is not int or stop < start):
        raise ValueError(f"read stop must be None or an int >= start ({start}), got {stop!r}")

"""Storage backends: the `StorageBackend` protocol (storage contract v2), the `StorageBatch` it
commits, the capability protocols, `MemoryStorage`, `SQLiteStorage` and `PostgresStorage`
(imported on first use: it needs the `postgres` extra, psycopg 3)."""

from typing import TYPE_CHECKING, Any

from ._base import (
    CAPABILITIES,
    STORAGE_CONTRACT,
    AppendStream,
    AppendStreams,
    CursorStore,
    IdempotencyRecord,
    IdempotencyStore,
    StorageBackend,
    StorageBatch,
    TreeStore,
    TreeTile,
    check_batch,
    check_contract,
    check_range,
    require_capability,
)
from .memory import MemoryStorage
from .sqlite import SQLiteStorage, verify_file

if TYPE_CHECKING:
    from .postgres import LeaseInfo, PostgresStorage

__all__ = [
    "CAPABILITIES",
    "STORAGE_CONTRACT",
    "AppendStream",
    "AppendStreams",
    "CursorStore",
    "IdempotencyRecord",
    "IdempotencyStore",
    "LeaseInfo",
    "MemoryStorage",
    "PostgresStorage",
    "SQLiteStorage",
    "StorageBackend",
    "StorageBatch",
    "TreeStore",
    "TreeTile",
    "check_batch",
    "check_contract",
    "check_range",
    "require_capability",
    "verify_file",
]


def __getattr__(name: str) -> Any:
    if name in ("PostgresStorage", "LeaseInfo"):
        from . import postgres

        value = getattr(postgres, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nucleus_actors.storage' has no attribute {name!r}")

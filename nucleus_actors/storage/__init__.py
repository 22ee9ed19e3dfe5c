"""Storage backends: the `StorageBackend` protocol (storage contract v2), the `StorageBatch` it
commits, the capability protocols, `MemoryStorage` and `SQLiteStorage`."""

from ._base import (
    CAPABILITIES,
    STORAGE_CONTRACT,
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

__all__ = [
    "CAPABILITIES",
    "STORAGE_CONTRACT",
    "CursorStore",
    "IdempotencyRecord",
    "IdempotencyStore",
    "MemoryStorage",
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

"""Storage backends: the `StorageBackend` protocol, `MemoryStorage` and `SQLiteStorage`."""

from ._base import StorageBackend
from .memory import MemoryStorage
from .sqlite import SQLiteStorage, verify_file

__all__ = ["MemoryStorage", "SQLiteStorage", "StorageBackend", "verify_file"]

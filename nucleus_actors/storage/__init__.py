"""Storage backends: the `StorageBackend` protocol, `MemoryStorage` and `SQLiteStorage`."""

from ._base import StorageBackend
from .memory import MemoryStorage

__all__ = ["MemoryStorage", "StorageBackend"]

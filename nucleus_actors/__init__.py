"""nucleus_actors: supervised actors on trio around a blake3-chained append-only ledger."""

from .config import LedgerConfig
from .errors import (
    IntegrityError,
    InvalidRecord,
    LedgerFailed,
    LifecycleError,
    ModuleError,
    NucleusError,
    RecordRejected,
    RegistryError,
    StorageError,
)
from .lifecycle import ModuleState, Phase
from .record import Entry, Hash, Receipt, Record
from .supervision import Backoff, Restart, Strategy

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "Entry",
    "Hash",
    "IntegrityError",
    "InvalidRecord",
    "LedgerConfig",
    "LedgerFailed",
    "LifecycleError",
    "ModuleError",
    "ModuleState",
    "NucleusError",
    "Phase",
    "Receipt",
    "Record",
    "RecordRejected",
    "RegistryError",
    "Restart",
    "StorageError",
    "Strategy",
]

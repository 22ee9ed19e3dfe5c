"""nucleus_actors: supervised actors on trio around a blake3-chained append-only ledger.

Everything public is importable from here; see docs/ for guides and reference.
"""

from .config import LedgerConfig
from .engine import LedgerEngine, open_ledger
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
from .lifecycle import LedgerState, ModuleState, Phase
from .module import LedgerReader, Module, ModuleContext, ModuleSpec, Overflow
from .record import Entry, Hash, Receipt, Record
from .registry import ModuleCounts, ModuleHandle, ModuleRegistry, ModuleStatus, Statistics
from .supervision import Backoff, Restart, Strategy

__version__ = "0.1.0"

__all__ = [
    # engine and lifecycle
    "LedgerEngine",
    "LedgerConfig",
    "LedgerState",
    "Phase",
    "open_ledger",
    # modules and supervision
    "Module",
    "ModuleContext",
    "LedgerReader",
    "ModuleHandle",
    "ModuleRegistry",
    "ModuleSpec",
    "ModuleStatus",
    "ModuleCounts",
    "ModuleState",
    "Statistics",
    "Restart",
    "Strategy",
    "Backoff",
    "Overflow",
    # values
    "Record",
    "Entry",
    "Hash",
    "Receipt",
    # errors
    "NucleusError",
    "ModuleError",
    "RecordRejected",
    "LifecycleError",
    "LedgerFailed",
    "RegistryError",
    "StorageError",
    "IntegrityError",
    "InvalidRecord",
]

"""nucleus_actors: supervised actors on trio around a blake3-chained append-only ledger.

Everything public is importable from here; see docs/ for guides and reference.

The package imports lazily (PEP 562): `import nucleus_actors` costs nothing, and a name is
imported from its private module on first use. So `nucleus_actors.proofs` (pure verification)
and the client commands of the CLI never import trio, FastAPI, hypercorn or pydantic.
"""

from __future__ import annotations as _annotations

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# public name -> the private module that defines it
_SOURCES: dict[str, str] = {
    "LedgerConfig": ".config",
    "CallbackCall": "._instrument",
    "CallbackOutcome": "._instrument",
    "CallbackResult": "._instrument",
    "Injection": "._instrument",
    "Instrument": "._instrument",
    "attach_instrument": "._instrument",
    "detach_instrument": "._instrument",
    "attached_instruments": "._instrument",
    "LedgerEngine": ".engine",
    "open_ledger": ".engine",
    "CommitUnknown": ".errors",
    "EventLoopError": ".errors",
    "Fenced": ".errors",
    "IdempotencyConflict": ".errors",
    "IntegrityError": ".errors",
    "InvalidRecord": ".errors",
    "LedgerFailed": ".errors",
    "LifecycleError": ".errors",
    "ModuleError": ".errors",
    "NucleusError": ".errors",
    "ProofError": ".errors",
    "RecordRejected": ".errors",
    "RegistryError": ".errors",
    "RemoteError": ".errors",
    "StorageError": ".errors",
    "LedgerState": ".lifecycle",
    "ModuleState": ".lifecycle",
    "Phase": ".lifecycle",
    "StopResult": ".lifecycle",
    "LedgerReader": ".module",
    "Module": ".module",
    "ModuleContext": ".module",
    "ModuleSpec": ".module",
    "Overflow": ".module",
    "Isolation": ".module",
    "Entry": ".record",
    "Hash": ".record",
    "Receipt": ".record",
    "Record": ".record",
    "ConsistencyProof": ".proofs",
    "InclusionProof": ".proofs",
    "ModuleCounts": ".registry",
    "ModuleHandle": ".registry",
    "ModuleRegistry": ".registry",
    "ModuleStatus": ".registry",
    "Statistics": ".registry",
    "Backoff": ".supervision",
    "Restart": ".supervision",
    "Strategy": ".supervision",
}

if _typing.TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._instrument import (
        CallbackCall,
        CallbackOutcome,
        CallbackResult,
        Injection,
        Instrument,
        attach_instrument,
        attached_instruments,
        detach_instrument,
    )
    from .config import LedgerConfig
    from .engine import LedgerEngine, open_ledger
    from .errors import (
        CommitUnknown,
        EventLoopError,
        Fenced,
        IdempotencyConflict,
        IntegrityError,
        InvalidRecord,
        LedgerFailed,
        LifecycleError,
        ModuleError,
        NucleusError,
        ProofError,
        RecordRejected,
        RegistryError,
        RemoteError,
        StorageError,
    )
    from .lifecycle import LedgerState, ModuleState, Phase, StopResult
    from .module import Isolation, LedgerReader, Module, ModuleContext, ModuleSpec, Overflow
    from .proofs import ConsistencyProof, InclusionProof
    from .record import Entry, Hash, Receipt, Record
    from .registry import ModuleCounts, ModuleHandle, ModuleRegistry, ModuleStatus, Statistics
    from .supervision import Backoff, Restart, Strategy

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
    "StopResult",
    "Statistics",
    "Restart",
    "Strategy",
    "Backoff",
    "Overflow",
    "Isolation",
    # instrumentation
    "Instrument",
    "CallbackCall",
    "CallbackResult",
    "CallbackOutcome",
    "Injection",
    "attach_instrument",
    "detach_instrument",
    "attached_instruments",
    # values
    "Record",
    "Entry",
    "Hash",
    "Receipt",
    "InclusionProof",
    "ConsistencyProof",
    # errors
    "NucleusError",
    "ModuleError",
    "RecordRejected",
    "LifecycleError",
    "LedgerFailed",
    "RegistryError",
    "RemoteError",
    "StorageError",
    "IntegrityError",
    "CommitUnknown",
    "Fenced",
    "IdempotencyConflict",
    "InvalidRecord",
    "ProofError",
    "EventLoopError",
]


def __getattr__(name: str) -> _typing.Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'nucleus_actors' has no attribute {name!r}")
    value = getattr(_importlib.import_module(source, __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

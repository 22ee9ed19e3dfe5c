"""Every error nucleus_actors raises, in one hierarchy.

```
NucleusError
├── InvalidRecord            (also ValueError)  bad record: type, size, kind, number range
├── LifecycleError           wrong phase for the call (carries phase)
│   └── LedgerFailed         escalation: restart intensity exceeded (cause = last crash)
├── RegistryError            duplicate/unknown id, dependency cycle, bad factory, bad dynamic op
├── ModuleError              module_id; a module failed a call (cause chained)
│   ├── RecordRejected       a before_append veto (reason)
│   └── RemoteError          an exception from an isolated module's worker (type_name, args)
├── StorageError             backend failure, lock held, wrong ledger id, unknown format
│   ├── IntegrityError       chain mismatch (seq of the first bad entry)
│   ├── CommitUnknown        the batch may or may not be stored (acknowledgement lost)
│   └── Fenced               another writer holds the ledger (a newer fencing epoch)
├── IdempotencyConflict      an idempotency key in flight, or reused for a different request
├── ProofError               (also ValueError)  a proof or checkpoint fails to verify
└── EventLoopError           (also RuntimeError) a trio API called from another event loop
```

Catch `NucleusError` to catch everything raised on purpose by this package. Each message says
which rule was broken and with which value; the structured fields (`module_id`, `seq`, `phase`,
`path`, ...) carry the same facts for programs.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CommitUnknown",
    "EventLoopError",
    "Fenced",
    "IdempotencyConflict",
    "IntegrityError",
    "InvalidRecord",
    "LedgerFailed",
    "LifecycleError",
    "ModuleError",
    "NucleusError",
    "ProofError",
    "RecordRejected",
    "RegistryError",
    "RemoteError",
    "StorageError",
]


def _printable(text: str) -> str:
    """`text` with every non-printable character written as a `\\uXXXX` escape.

    Control characters, format characters (U+200B ...), separators other than the ASCII space
    and lone surrogates (which no encoding accepts) are escaped, so that a message always
    prints on one line and encodes as UTF-8.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class NucleusError(Exception):
    """Base class of every error raised on purpose by nucleus_actors.

    `str()` of any of them is encodable as UTF-8: a lone surrogate (from a key or value that
    is not valid Unicode text) is written as a `\\udXXX` escape.
    """

    def __str__(self) -> str:
        return _encodable(super().__str__())


class InvalidRecord(NucleusError, ValueError):
    """A record breaks a validation rule (type, size, kind, number range).

    Attributes:
        path: JSON path of the offending value (`$` is the record itself, `$.payload.items[2]`
            a nested value), or `None` when the rule concerns the record as a whole.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        # Both may quote the offending value or key: keep them printable on one line.
        message = _printable(message)
        path = None if path is None else _printable(path)
        super().__init__(message if path is None else f"{message} (at {path})")
        self.path = path


class LifecycleError(NucleusError):
    """A call was made in a phase that does not allow it.

    Attributes:
        phase: the phase the ledger was in (a `Phase`), or `None` when not applicable.
    """

    def __init__(self, message: str, *, phase: Any = None) -> None:
        super().__init__(message)
        self.phase = phase


class LedgerFailed(LifecycleError):
    """The supervisor escalated: restarts ran away, every module was stopped.

    The ledger is `FAILED`; `__cause__` is the last crash that exceeded the restart intensity.
    """


class RegistryError(NucleusError):
    """A registry rule was broken: duplicate or unknown id, cycle, bad factory, bad dynamic op.

    Attributes:
        module_id: the module id concerned, when there is one.
    """

    def __init__(self, message: str, *, module_id: str | None = None) -> None:
        super().__init__(message)
        self.module_id = module_id


class ModuleError(NucleusError):
    """A module failed a call (crashed, timed out, or is not available); cause chained.

    Attributes:
        module_id: id of the module that failed.
    """

    def __init__(self, message: str, *, module_id: str | None = None) -> None:
        super().__init__(message)
        self.module_id = module_id


class RecordRejected(ModuleError):
    """A module's `before_append` vetoed the record; nothing was stored.

    Raise it from `before_append` with a reason; the runtime fills in `module_id` (and, for
    `append_many`, `index`, the position of the vetoed record in the batch).

    Attributes:
        reason: why the module refused the record.
        module_id: id of the module that refused (set by the runtime).
        index: position of the refused record in an `append_many` batch, else `None`.
    """

    def __init__(self, reason: str, *, module_id: str | None = None) -> None:
        self.reason = reason
        self.index: int | None = None
        super().__init__(reason, module_id=module_id)

    def __str__(self) -> str:
        where = f" (record {self.index} of the batch)" if self.index is not None else ""
        if self.module_id is None:
            return _encodable(self.reason)
        return _encodable(f"module {self.module_id!r} rejected the record{where}: {self.reason}")


class RemoteError(ModuleError):
    """An exception raised in the worker process of an isolated module, copied to the parent.

    Exceptions cross the process boundary as (type name, args, repr): `RecordRejected` and
    builtin exceptions are rebuilt as themselves, any other type arrives as a `RemoteError`
    whose message is the original `repr`.

    Attributes:
        type_name: qualified name of the original exception type (`"package.module.Type"`).
        remote_args: the original `args` (each one as its `repr` if it did not pickle).
    """

    def __init__(
        self,
        message: str,
        *,
        type_name: str,
        remote_args: tuple[Any, ...] = (),
        module_id: str | None = None,
    ) -> None:
        super().__init__(message, module_id=module_id)
        self.type_name = type_name
        self.remote_args = remote_args


class StorageError(NucleusError):
    """The storage backend failed, or refused to open (lock held, wrong ledger, format)."""


class IntegrityError(StorageError):
    """The stored chain does not verify.

    Attributes:
        seq: seq of the first entry that fails verification.
    """

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


class CommitUnknown(StorageError):
    """The outcome of a batch is unknown: it may or may not have been stored.

    Raised by a backend when the commit's acknowledgement was lost (a connection dropped during
    `COMMIT`, an fsync error after the write). The engine then re-reads the storage head to
    learn what happened before it goes on.
    """


class Fenced(StorageError):
    """Another writer holds the ledger: this writer's fencing epoch is no longer current.

    Nothing of the refused batch was stored. A fenced engine must stop writing.

    Attributes:
        epoch: the epoch this writer held, when known.
        current: the epoch now current in storage, when known.
    """

    def __init__(self, message: str, *, epoch: int | None = None, current: int | None = None):
        super().__init__(message)
        self.epoch = epoch
        self.current = current


class ProofError(NucleusError, ValueError):
    """A Merkle proof or a signed checkpoint is malformed or does not verify."""


class EventLoopError(NucleusError, RuntimeError):
    """A trio API of nucleus_actors was called from another event loop (e.g. asyncio).

    nucleus_actors runs on trio; from asyncio use `nucleus_actors.aio.open_ledger`.
    """


class IdempotencyConflict(NucleusError):
    """An append with an idempotency key cannot run: the key is in flight, or it was used
    (within the window) for a different request.

    Attributes:
        key: the idempotency key.
        in_flight: True when another append with the key has not finished yet (retry later:
            HTTP 409); False when the key's first use had a different request (HTTP 422).
    """

    def __init__(self, message: str, *, key: str, in_flight: bool) -> None:
        super().__init__(message)
        self.key = key
        self.in_flight = in_flight

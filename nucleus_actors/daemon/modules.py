"""The modules that ship with the daemon; a configuration names them by their short name.

* `require-fields` (`RequireFields`) — a validator: records of the chosen kinds must carry some
  payload fields.
* `json-schema` (`JsonSchemaValidator`) — a validator: each kind's payload must match its JSON
  Schema; a rejection names the failing location and schema keyword.
* `kind-counter` (`KindCounter`) — an index: counts committed records per kind (optionally
  keeps their seqs), exactly once across restarts and kill -9 (a durable module that keeps
  its counts with its position in its own `state` file); answers `ask`, shown by
  `nucleus status`.
* `jsonl-mirror` (`JsonlMirror`) — a sink: copies every committed entry to a JSON Lines file,
  and after any restart resumes exactly where the file stops.

They use nothing but the public module API, so they double as examples for module authors.
A module that defines `describe()` (sync, returning a JSON object) has it shown as `info` by
the daemon's modules API and by `nucleus status`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from array import array
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import trio

from .._jcs import json_path
from ..errors import RecordRejected
from ..hashing import genesis
from ..module import Module, ModuleContext
from ..record import Hash, Record
from .wire import entry_line, export_header, parse_export_header

__all__ = [
    "JsonSchemaValidator",
    "JsonlMirror",
    "KindCounter",
    "RequireFields",
    "SchemaViolation",
]


def _strings(config: Mapping[str, Any], key: str, *, required: bool) -> tuple[str, ...]:
    value = config.get(key)
    if value is None and not required:
        return ()
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise ValueError(
            f"config {key!r} must be a non-empty list of non-empty strings, got {value!r}"
        )
    return tuple(value)


class RequireFields(Module):
    """Reject records whose payload lacks required top-level fields.

    Config:
        fields: the payload keys every checked record must have (required, a list of str).
        kinds: kind prefixes to check (`["order."]` checks `order.created`, ...); unset checks
            every record.

    A checked record whose payload is not an object, or misses a field, is rejected (409 over
    HTTP) with a reason naming the missing fields. Bad config fails `init`, so the ledger does
    not start.
    """

    id = "require-fields"
    version = "1.0.0"

    def __init__(self) -> None:
        self.fields: tuple[str, ...] = ()
        self.kinds: tuple[str, ...] = ()

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Check `fields` and `kinds` (`nucleus check` and `init` both call it).

        Raises:
            ValueError: `fields` is missing or not a list of strings, or `kinds` is malformed.
        """
        _strings(config, "fields", required=True)
        _strings(config, "kinds", required=False)

    async def init(self, ctx: ModuleContext) -> None:
        """Read and check `fields` and `kinds` from the config.

        Raises:
            ValueError: `fields` is missing or not a list of strings, or `kinds` is malformed.
        """
        self.fields = _strings(ctx.config, "fields", required=True)
        self.kinds = _strings(ctx.config, "kinds", required=False)

    async def before_append(self, record: Record) -> Record | None:
        """Veto a checked record that misses a required field; pass the others unchanged.

        Raises:
            RecordRejected: naming the kind and the missing fields.
        """
        if self.kinds and not record.kind.startswith(self.kinds):
            return None
        payload = record.payload
        if not isinstance(payload, Mapping):
            names = ", ".join(repr(name) for name in self.fields)
            raise RecordRejected(
                f"record of kind {record.kind!r} needs an object payload with {names}"
            )
        missing = [repr(name) for name in self.fields if name not in payload]
        if missing:
            raise RecordRejected(
                f"record of kind {record.kind!r} is missing {', '.join(missing)} in its payload"
            )
        return None


class _CounterState:
    """kind-counter's own SQLite file: counts, index and position, saved in one transaction.

    Blocking calls; the module runs them in a worker thread. WAL with `synchronous=NORMAL`:
    a process crash (kill -9) loses nothing committed; an OS crash may lose the last snapshots,
    which is harmless: counts and position always go back together, and the runtime delivers
    again everything after the position it finds.
    """

    FORMAT: Final = 1

    def __init__(self, path: str) -> None:
        self.path = Path(os.path.expanduser(path)).absolute()
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value ANY) STRICT")
            db.execute(
                "CREATE TABLE IF NOT EXISTS counts (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)"
                " STRICT"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS seqs (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL)"
                " STRICT"
            )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        self.db = db

    def load(self) -> tuple[dict[str, Any], dict[str, int], dict[str, array[int]] | None]:
        """`(meta, counts, index)`: `meta` is empty for a new file; `index` None when the
        snapshot keeps none."""
        assert self.db is not None
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if not meta:
            return {}, {}, None
        if meta.get("format") != self.FORMAT:
            raise ValueError(
                f"{self.path}: kind-counter state format {meta.get('format')!r}, this version "
                f"reads {self.FORMAT} (move it away: the counts are then rebuilt)"
            )
        counts = dict(self.db.execute("SELECT kind, n FROM counts"))
        index: dict[str, array[int]] | None = None
        if meta.get("indexed"):
            index = {}
            for kind, seq in self.db.execute("SELECT kind, seq FROM seqs ORDER BY seq"):
                seqs = index.get(kind)
                if seqs is None:
                    seqs = index[kind] = array("q")
                seqs.append(seq)
        return meta, counts, index

    def save(
        self,
        meta: Mapping[str, Any],
        counts: Mapping[str, int],
        seqs: Sequence[tuple[int, str]],
        *,
        reset: bool = False,
    ) -> None:
        """Store the changed `counts` (kind -> new total), the new index `seqs` and `meta` (the
        position) in one transaction; `reset` first forgets everything."""
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            if reset:
                for table in ("meta", "counts", "seqs"):
                    db.execute(f"DELETE FROM {table}")  # fixed table names
            db.executemany(
                "INSERT INTO counts (kind, n) VALUES (?, ?) "
                "ON CONFLICT (kind) DO UPDATE SET n = excluded.n",
                counts.items(),
            )
            db.executemany("INSERT OR REPLACE INTO seqs (seq, kind) VALUES (?, ?)", seqs)
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            db.close()


class KindCounter(Module):
    """Count committed records per kind, exactly once even across restarts and kill -9.

    Config:
        index: also keep the seqs of each kind (`seqs(kind)`), default false. Costs 8 bytes
            per entry of memory (and of the state file).
        state: a SQLite file where it keeps its counts with its position (created with its
            directory; relative paths resolve against the daemon's working directory). One
            ledger per file. Unset: counts live in memory only.
        snapshot_every: with `state`, save after at most this many newly counted entries
            (default 1000), and always on `stop`.

    It is a durable module that owns its position (`resume_after`): register it with
    `ModuleSpec(KindCounter, durable=True)` (the daemon does so by itself). With `state`, each
    snapshot stores the counts (the kinds that changed), the new index seqs, the position (the
    last seq counted) and that entry's hash in one transaction; on start it loads the snapshot,
    checks the hash against the ledger, and `resume_after` returns the position: the runtime
    then delivers only the entries committed after it (at most `snapshot_every` plus what came
    since, after a kill -9), so starting costs O(kinds + entries since the snapshot), not a
    read of the ledger (with `index`, loading the index is O(entries) of the state file). A
    snapshot of another history (the ledger was restored from an older backup) is dropped with
    a warning and everything is counted again; one of another ledger id is an error.

    Without `state`, an instance that already counted (a module restart that reuses the
    instance) resumes where it was; a fresh instance (a restart from a factory, a daemon
    restart) is fed the ledger from `start_at` by the runtime's catch-up: O(n) for a large
    ledger, hence `state`.

    A redelivery (anything at or before its position) is recognised by its seq and skipped.
    Ask it, e.g. `await handle.ask(lambda m: dict(m.counts))` or
    `await handle.ask(KindCounter.count, "order.created")`. On `stop` it logs the totals.
    """

    id = "kind-counter"
    version = "2.0.0"

    SHOWN_KINDS: Final = 20
    """`describe()` lists at most this many kinds (the most frequent)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        """Committed records per kind (copy it inside an `ask`: `dict(m.counts)`)."""
        self.index: dict[str, array[int]] | None = None
        """Seqs per kind, when `config.index` is true."""
        self.next_seq = 0
        """The first seq not counted yet."""
        self.saved_seq = 0
        """`next_seq` as of the last snapshot in the state file."""
        self.snapshot_every = 1000
        self._state: _CounterState | None = None
        self._ledger: str | None = None  # the ledger these counts are of (None: nothing yet)
        self._last_hash = ""  # hex hash of entry next_seq - 1
        self._changed: set[str] = set()  # kinds whose count changed since the last snapshot
        self._new_seqs: list[tuple[int, str]] = []  # index seqs since the last snapshot
        self._reset = False  # the next snapshot replaces the whole file

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Check `index`, `state` and `snapshot_every` (`nucleus check` and `init` call it).

        Raises:
            ValueError: `index` is not a boolean, `state` not a non-empty string, or
                `snapshot_every` not an integer >= 1.
        """
        keep = config.get("index", False)
        if not isinstance(keep, bool):
            raise ValueError(f"config 'index' must be true or false, got {keep!r}")
        state = config.get("state")
        if state is not None and (not isinstance(state, str) or not state):
            raise ValueError(f"config 'state' must be a non-empty string (a path), got {state!r}")
        every = config.get("snapshot_every", 1000)
        if type(every) is not int or every < 1:
            raise ValueError(f"config 'snapshot_every' must be an integer >= 1, got {every!r}")

    async def init(self, ctx: ModuleContext) -> None:
        """Read the config; with `state`, load the last snapshot and check it against the
        ledger.

        Raises:
            ValueError: bad config; the state file belongs to another ledger or is of an
                unknown format.
            sqlite3.Error: the state file cannot be opened or read.
        """
        self.check_config(ctx.config)
        keep = ctx.config.get("index", False)
        self.snapshot_every = ctx.config.get("snapshot_every", 1000)
        path = ctx.config.get("state")
        same = self._ledger == ctx.ledger_id and (self.index is not None) == keep
        if path is None:
            if not same:  # a fresh instance: counted from start_at by the runtime
                self._forget(keep)
            return
        state = _CounterState(path)
        await trio.to_thread.run_sync(state.open)
        try:
            meta, counts, index = await trio.to_thread.run_sync(state.load)
            self._forget(keep)
            if meta:
                if meta.get("ledger_id") != ctx.ledger_id:
                    raise ValueError(
                        f"{state.path} holds the counts of ledger {meta.get('ledger_id')!r}, "
                        f"not {ctx.ledger_id!r} (one ledger per state file)"
                    )
                if await self._matches(ctx, meta, keep):
                    self.counts = counts
                    self.index = index if keep else None
                    self.next_seq = self.saved_seq = int(meta["next_seq"])
                    self._last_hash = str(meta["hash"])
                else:
                    self._reset = True
        except BaseException:
            await trio.to_thread.run_sync(state.close)
            raise
        self._state = state

    async def _matches(self, ctx: ModuleContext, meta: Mapping[str, Any], keep: bool) -> bool:
        """Whether a snapshot describes this ledger's history, with the wanted index."""
        position = int(meta["next_seq"]) - 1
        if bool(meta.get("indexed")) != keep:
            ctx.log.info("index setting changed: counting the ledger again")
            return False
        if position < 0:
            return True
        if position >= ctx.ledger.state.length:
            ctx.log.warning(
                "state file %s counted up to seq %d but the ledger has %d entries (restored "
                "from an older backup?): counting it again",
                self._state_path(ctx),
                position,
                ctx.ledger.state.length,
            )
            return False
        entry = await ctx.ledger.get(position)
        if entry.hash.hex() != meta.get("hash"):
            ctx.log.warning(
                "state file %s does not match the ledger at seq %d (another history): "
                "counting it again",
                self._state_path(ctx),
                position,
            )
            return False
        return True

    @staticmethod
    def _state_path(ctx: ModuleContext) -> str:
        return str(ctx.config.get("state"))

    def _forget(self, keep: bool) -> None:
        self.counts = {}
        self.index = {} if keep else None
        self.next_seq = self.saved_seq = 0
        self._last_hash = ""
        self._changed = set()
        self._new_seqs = []
        self._ledger = None
        self._reset = False

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        """The last seq counted (None: nothing yet; the runtime then uses `start_at`)."""
        self._ledger = ctx.ledger_id
        if self._reset:
            return -1  # the snapshot was of another history: count everything again
        return self.next_seq - 1 if self.next_seq else None

    def _count(self, kind: str, seq: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.index is not None:
            seqs = self.index.get(kind)
            if seqs is None:
                seqs = self.index[kind] = array("q")
            seqs.append(seq)
            if self._state is not None:
                self._new_seqs.append((seq, kind))
        if self._state is not None:
            self._changed.add(kind)
        self.next_seq = seq + 1

    async def after_append(self, record: Record, hash: Hash) -> None:
        """Count the record unless its seq was counted already (a redelivery); save a
        snapshot every `snapshot_every` entries (with `state`)."""
        seq = record.seq
        assert seq is not None
        if seq < self.next_seq:
            return
        self._count(record.kind, seq)
        self._last_hash = hash.hex()
        if self._state is not None and self.next_seq - self.saved_seq >= self.snapshot_every:
            await self._snapshot()

    async def _snapshot(self) -> None:
        """Save what changed since the last snapshot, with the position, in one transaction.

        Cancellation: the transaction runs in a worker thread and completes (or rolls back)
        there; the snapshot then counts as saved only if this call returned.
        """
        state = self._state
        if state is None or (self.next_seq == self.saved_seq and not self._reset):
            return
        position = self.next_seq
        meta = {
            "format": _CounterState.FORMAT,
            "ledger_id": self._ledger,
            "next_seq": position,
            "hash": self._last_hash,
            "indexed": int(self.index is not None),
        }
        counts = {kind: self.counts[kind] for kind in self._changed}
        seqs, reset = self._new_seqs, self._reset
        await trio.to_thread.run_sync(partial(state.save, meta, counts, seqs, reset=reset))
        self.saved_seq = position
        self._changed = set()
        self._new_seqs = []
        self._reset = False

    # -- queries (run them with `ask`) -----------------------------------------------------
    def count(self, kind: str) -> int:
        """How many committed records have this kind."""
        return self.counts.get(kind, 0)

    def seqs(self, kind: str, start: int = 0, limit: int | None = None) -> list[int]:
        """The seqs of the records of `kind` that are >= `start`, at most `limit` of them.

        Raises:
            RuntimeError: the module runs without `index = true`.
        """
        if self.index is None:
            raise RuntimeError("kind-counter keeps no index: set config 'index = true'")
        seqs = self.index.get(kind, array("q"))
        lo, hi = 0, len(seqs)
        while lo < hi:  # first position with seq >= start
            mid = (lo + hi) // 2
            if seqs[mid] < start:
                lo = mid + 1
            else:
                hi = mid
        end = len(seqs) if limit is None else min(len(seqs), lo + limit)
        return seqs[lo:end].tolist()

    def describe(self) -> dict[str, Any]:
        """`{"total", "kinds": {kind: count} (the most frequent), "distinct_kinds",
        "indexed"}` for `nucleus status`."""
        top = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))
        return {
            "total": sum(self.counts.values()),
            "kinds": dict(top[: self.SHOWN_KINDS]),
            "distinct_kinds": len(top),
            "indexed": self.index is not None,
        }

    async def stop(self, ctx: ModuleContext) -> None:
        """Save a last snapshot (with `state`), close the file and log the totals."""
        state = self._state
        if state is not None:
            try:
                await self._snapshot()
            finally:
                self._state = None
                await trio.to_thread.run_sync(state.close)
        total = sum(self.counts.values())
        ctx.log.info("%d records counted by kind: %s", total, self.counts)


# -- JSON Schema -----------------------------------------------------------------------------
class SchemaViolation(RecordRejected):
    """`json-schema` refused a record: its payload does not match its kind's schema.

    Attributes:
        path: where in the record the first error is, as a JSON path (`$.payload.items[0]`).
        schema_path: the schema keyword that failed, as a JSON pointer fragment
            (`#/properties/items/items/minimum`).
        errors: how many errors the payload has in all.
    """

    def __init__(self, reason: str, *, path: str, schema_path: str, errors: int) -> None:
        super().__init__(reason)
        self.path = path
        self.schema_path = schema_path
        self.errors = errors


def _pointer(parts: Sequence[Any]) -> str:
    escaped = (str(part).replace("~", "~0").replace("/", "~1") for part in parts)
    return "#/" + "/".join(escaped) if parts else "#"


class JsonSchemaValidator(Module):
    """Reject records whose payload does not match the JSON Schema of their kind.

    Config:
        schemas: a table kind -> schema. A schema is a table (inline JSON Schema) or a string,
            the path of a JSON file holding one (relative paths resolve against the daemon's
            working directory). A key ending in `*` is a prefix (`"order.*"`); an exact kind
            wins over a prefix, a longer prefix over a shorter one.
        unknown_kinds: `"allow"` (default) lets records of kinds without a schema through;
            `"reject"` refuses them.

    The schema's `$schema` picks the draft (default: the latest jsonschema knows); `format`
    is checked. A rejection (409 over HTTP) is a `SchemaViolation` whose reason names the
    failing location in the record and the schema keyword; the problem object carries them as
    `path` and `schema_path`. A schema that is not valid, or a file that does not load, fails
    `init`, so the ledger does not start.
    """

    id = "json-schema"
    version = "1.0.0"

    def __init__(self) -> None:
        self.exact: dict[str, Any] = {}
        self.prefixes: list[tuple[str, Any]] = []  # longest first
        self.reject_unknown = False
        self.checked = 0
        self.rejected = 0

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Load and check every schema (`nucleus check` calls it; `init` compiles the same).

        Raises:
            ValueError: `schemas` is missing or malformed, a file does not load, a schema is
                not a valid JSON Schema, or `unknown_kinds` is not "allow" or "reject".
        """
        JsonSchemaValidator._compile(config)

    @staticmethod
    def _compile(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Any]], bool]:
        """`(exact, prefixes longest first, reject_unknown)` from the config (blocking: it may
        read schema files)."""
        from jsonschema import exceptions, validators

        schemas = config.get("schemas")
        if not isinstance(schemas, Mapping) or not schemas:
            raise ValueError(
                f"config 'schemas' must be a non-empty table of kind -> schema, got {schemas!r}"
            )
        unknown = config.get("unknown_kinds", "allow")
        if unknown not in ("allow", "reject"):
            raise ValueError(f"config 'unknown_kinds' must be 'allow' or 'reject', got {unknown!r}")
        exact: dict[str, Any] = {}
        prefixes: list[tuple[str, Any]] = []
        for kind, given in schemas.items():
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"config 'schemas': {kind!r} is not a kind")
            if isinstance(given, str):
                schema = _load_json_file(given, kind)
            elif isinstance(given, Mapping):
                schema = dict(given)
            else:
                raise ValueError(
                    f"config 'schemas'[{kind!r}] must be a table (a JSON Schema) or the path "
                    f"of a JSON file, got {given!r}"
                )
            cls = validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except exceptions.SchemaError as exc:
                where = _pointer(list(exc.absolute_path))
                raise ValueError(
                    f"config 'schemas'[{kind!r}] is not a valid JSON Schema at {where}: "
                    f"{exc.message}"
                ) from None
            validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
            if kind.endswith("*"):
                prefixes.append((kind[:-1], validator))
            else:
                exact[kind] = validator
        prefixes.sort(key=lambda item: -len(item[0]))
        return exact, prefixes, unknown == "reject"

    async def init(self, ctx: ModuleContext) -> None:
        """Load and check every schema (in a worker thread: schema files are read).

        Raises:
            ValueError: `schemas` is missing or malformed, a file does not load, a schema is
                not a valid JSON Schema, or `unknown_kinds` is not "allow" or "reject".
        """
        compiled = await trio.to_thread.run_sync(self._compile, ctx.config)
        self.exact, self.prefixes, self.reject_unknown = compiled

    def _validator(self, kind: str) -> Any:
        found = self.exact.get(kind)
        if found is not None:
            return found
        for prefix, validator in self.prefixes:
            if kind.startswith(prefix):
                return validator
        return None

    async def before_append(self, record: Record) -> Record | None:
        """Pass a record whose payload matches its kind's schema; veto the others.

        Raises:
            SchemaViolation: naming the location in the record and the failed keyword.
            RecordRejected: the kind has no schema and `unknown_kinds = "reject"`.
        """
        from jsonschema.exceptions import best_match

        validator = self._validator(record.kind)
        if validator is None:
            if self.reject_unknown:
                self.rejected += 1
                raise RecordRejected(
                    f"no schema for kind {record.kind!r} (unknown_kinds = 'reject')"
                )
            return None
        self.checked += 1
        errors = list(validator.iter_errors(record.payload))
        if not errors:
            return None
        self.rejected += 1
        error = best_match(errors)
        path = json_path("$.payload", list(reversed(error.absolute_path)))
        schema_path = _pointer(list(error.absolute_schema_path))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SchemaViolation(
            f"payload of kind {record.kind!r} does not match its schema at {path}: "
            f"{error.message} (schema {schema_path}){more}",
            path=path,
            schema_path=schema_path,
            errors=len(errors),
        )

    def describe(self) -> dict[str, Any]:
        """`{"kinds", "checked", "rejected"}`: the kinds with a schema and what was checked."""
        kinds = sorted(self.exact) + sorted(prefix + "*" for prefix, _ in self.prefixes)
        return {"kinds": kinds, "checked": self.checked, "rejected": self.rejected}


def _load_json_file(path: str, kind: str) -> Any:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        raise ValueError(
            f"config 'schemas'[{kind!r}]: cannot read {path}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"config 'schemas'[{kind!r}]: {path} is not JSON: {exc}") from None


# -- JSON Lines mirror -----------------------------------------------------------------------
class _MirrorFile:
    """The mirror's file: a scan that finds where it stops (dropping a torn last line), then
    appends. Blocking calls; the module runs the slow ones in a worker thread."""

    TAIL_CHUNK: Final = 64 * 1024

    def __init__(self, path: str) -> None:
        self.given = path
        self.path = Path(path)
        self.file: IO[bytes] | None = None

    def open_and_scan(self) -> tuple[dict[str, Any] | None, tuple[int, str] | None]:
        """Open for appending; return the header (None when the file is empty) and `(seq,
        hash)` of the last complete entry line (None when there is none). A torn last line
        (no newline: a crash mid-write) is cut off.

        Raises:
            ValueError: the file does not start with an export header, or its last line is
                not a mirrored entry.
        """
        self.path = Path(os.path.expanduser(self.given)).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+b")  # noqa: SIM115 - kept open until close()
        try:
            size = file.seek(0, os.SEEK_END)
            end = size
            tail = b""
            while end > 0:  # find the start of the last complete line
                start = max(0, end - self.TAIL_CHUNK)
                file.seek(start)
                tail = file.read(end - start) + tail
                end = start
                if tail.count(b"\n") >= 2 or (end == 0 and b"\n" in tail):
                    break
            complete = tail[: tail.rfind(b"\n") + 1] if b"\n" in tail else b""
            keep = end + len(complete)
            if keep < size:
                file.truncate(keep)
                file.flush()
                os.fsync(file.fileno())
            self.file = file
            if keep == 0:
                return None, None
            file.seek(0)
            first = file.readline()
            try:
                header = parse_export_header(first)
            except ValueError as exc:
                raise ValueError(f"{self.path}: {exc}") from None
            if header is None:
                raise ValueError(
                    f"{self.path} does not start with an export header line (a mirror "
                    "written before the export format had one?): move it away, the mirror "
                    "then writes the whole ledger again"
                )
            last = complete[:-1].rsplit(b"\n", 1)[-1]
            if len(first) >= keep:
                return header, None  # the header alone
            try:
                data = json.loads(last)
                seq, digest = data["seq"], data["hash"]
                if type(seq) is not int or not isinstance(digest, str):
                    raise TypeError("seq or hash has the wrong type")
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(
                    f"{self.path} does not look like a jsonl-mirror file: its last line is not "
                    f"an entry ({type(exc).__name__}: {exc})"
                ) from None
            return header, (seq, digest)
        except BaseException:
            file.close()
            self.file = None
            raise

    def write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)
        self.file.flush()

    def sync(self) -> None:
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            finally:
                self.file.close()
                self.file = None


class JsonlMirror(Module):
    """Copy every committed entry to a JSON Lines file, resuming exactly where it stops.

    Config:
        path: the file (required; created with its directory; relative paths resolve against
            the daemon's working directory). One ledger per file.
        fsync: fsync after every entry (default false: the OS writes it back; the file is
            flushed after every entry and fsynced on stop).

    The file is in the export format (docs/hashing.md, "Exports"): a header line
    `{"nucleus_export":1,"ledger_id","from":0,"prev"}`, then one line per entry (`seq`,
    `kind`, `payload`, `meta`, `timestamp`, `hash`, `canonical`): byte for byte what `nucleus
    export` writes for the same ledger.

    Resuming: it is a durable module that owns its position (`resume_after`). On `init`
    (first start, restart after a crash, daemon restart) it reads the file's last line, cuts
    off a torn one (a crash mid-write) and checks that this entry's hash matches the
    ledger's; `resume_after` returns that seq, and the runtime delivers every entry committed
    since, in order, from storage then live (see docs/delivery.md): the file always holds
    seqs 0, 1, 2, ... with no gap and no duplicate, across kill -9 too. A delivery it already
    wrote is still skipped by seq.
    """

    id = "jsonl-mirror"
    version = "1.0.0"

    def __init__(self) -> None:
        self.file: _MirrorFile | None = None
        self.next_seq = 0
        """The first seq not in the file yet."""
        self.fsync = False
        self._ctx: ModuleContext | None = None

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Check `path` and `fsync` (`nucleus check` and `init` both call it).

        Raises:
            ValueError: `path` is not a non-empty string, or `fsync` is not a boolean.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"config 'path' must be a non-empty string, got {path!r}")
        fsync = config.get("fsync", False)
        if not isinstance(fsync, bool):
            raise ValueError(f"config 'fsync' must be true or false, got {fsync!r}")

    async def init(self, ctx: ModuleContext) -> None:
        """Open the file, check it against the ledger and copy what it misses.

        Raises:
            ValueError: bad config; the file does not look like a mirror; its last entry is not
                in the ledger or has another hash (it mirrors another ledger or was edited).
            OSError: the file cannot be opened or written.
        """
        self.check_config(ctx.config)
        path = ctx.config["path"]
        self.fsync = ctx.config.get("fsync", False)
        self._ctx = ctx
        file = _MirrorFile(path)
        header, last = await trio.to_thread.run_sync(file.open_and_scan)
        self.file = file
        try:
            if header is None:
                file.write(export_header(ctx.ledger_id, 0, genesis(ctx.ledger_id)))
            elif header["ledger_id"] != ctx.ledger_id or header["from"] != 0:
                raise ValueError(
                    f"{file.path} mirrors ledger {header['ledger_id']!r} from seq "
                    f"{header['from']}, not ledger {ctx.ledger_id!r} from 0 (move it away to "
                    "start afresh)"
                )
            self.next_seq = 0 if last is None else await self._check(ctx, file, *last)
        except BaseException:
            await trio.to_thread.run_sync(file.close)
            self.file = None
            raise

    async def _check(self, ctx: ModuleContext, file: _MirrorFile, seq: int, digest: str) -> int:
        length = ctx.ledger.state.length
        if seq >= length:
            raise ValueError(
                f"{file.path} ends at seq {seq} but ledger {ctx.ledger_id!r} has {length} "
                "entries: the file mirrors another ledger (move it away to start afresh)"
            )
        entry = await ctx.ledger.get(seq)
        if entry.hash.hex() != digest:
            raise ValueError(
                f"{file.path} does not match ledger {ctx.ledger_id!r} at seq {seq} (hash "
                f"{digest[:16]}... in the file, {entry.hash.hex()[:16]}... in the ledger): it "
                "mirrors another ledger or was edited"
            )
        return seq + 1

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        """The last seq in the file (None: an empty file): the runtime resumes after it."""
        return self.next_seq - 1 if self.next_seq else None

    async def _write(self, record: Record, hash: Hash) -> None:
        assert self.file is not None
        assert record.seq is not None
        self.file.write(entry_line(record, hash))
        self.next_seq = record.seq + 1
        if self.fsync:
            await trio.to_thread.run_sync(self.file.sync)

    async def after_append(self, record: Record, hash: Hash) -> None:
        """Append the entry; skip one already in the file (the runtime sends no gap)."""
        assert record.seq is not None
        if record.seq < self.next_seq:
            return
        if record.seq != self.next_seq:
            raise RuntimeError(
                f"jsonl-mirror expected seq {self.next_seq}, got {record.seq}: it must run "
                "as a durable module"
            )
        await self._write(record, hash)

    def describe(self) -> dict[str, Any]:
        """`{"path", "next_seq"}`: the file and the first seq not in it yet."""
        return {
            "path": None if self.file is None else str(self.file.path),
            "next_seq": self.next_seq,
        }

    async def stop(self, ctx: ModuleContext) -> None:
        """Flush, fsync and close the file."""
        if self.file is not None:
            file, self.file = self.file, None
            await trio.to_thread.run_sync(file.close)

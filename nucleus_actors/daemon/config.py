"""The daemon's configuration file (TOML), validated with pydantic.

```toml
port = 8470
[[ledgers]]
id = "orders"
storage = "orders.db"            # relative to this file's directory; ":memory:" for RAM
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:RequireFields"
config = { fields = ["customer"] }
```

`load_config(path)` reads and validates a file; every problem (unknown key, bad value, a `use`
that does not import or is not a `Module`, duplicate ledger ids, ...) is collected into one
`ConfigError` that lists each with its path (`ledgers[0].modules[1].use`). docs/daemon.md is
the reference of every key; a test keeps the two in step.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..config import LEDGER_ID_PATTERN, LedgerConfig
from ..errors import NucleusError
from ..module import Isolation, Module, ModuleSpec, Overflow
from ..supervision import Backoff, Restart, Strategy
from .discovery import resolve_use

if TYPE_CHECKING:
    from .guards import HttpLimits

__all__ = [
    "MEMORY",
    "BackoffSettings",
    "ConfigError",
    "ConfigProblem",
    "DaemonConfig",
    "LedgerSettings",
    "ModuleSettings",
    "load_config",
    "parse_config",
    "resolve_use",
]

MEMORY: Final = ":memory:"
"""The `storage` value that keeps a ledger in process memory (gone when the daemon exits)."""

_ENV_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID_RULE: Final = "1..128 letters, digits, '_', '.', '-', starting with a letter or digit"


def _matching(value: str, pattern: re.Pattern[str], rule: str) -> str:
    if pattern.fullmatch(value) is None:
        raise PydanticCustomError("pattern", "must be {rule}", {"rule": rule})
    return value


# -- errors ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in a configuration file."""

    path: str
    """Where it is: `ledgers[0].modules[1].use`; empty for the file as a whole."""
    message: str
    """What is wrong, with the offending value."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(NucleusError, ValueError):
    """A daemon configuration is unusable; `problems` lists every error found, with its path.

    Attributes:
        source: the file (or other source) the configuration came from.
        problems: every problem found, in file order.
    """

    def __init__(self, source: str, problems: Sequence[ConfigProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        count = len(self.problems)
        lines = [f"{source}: {count} configuration error{'s' if count != 1 else ''}"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


# -- models ----------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True
    )


class BackoffSettings(_Section):
    """`backoff = {...}`: delay before restarting a module that keeps crashing (see `Backoff`)."""

    initial: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    """Seconds before the first restart."""
    multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    """Growth factor per consecutive restart (>= 1)."""
    max: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """Cap on the delay before jitter, in seconds."""
    jitter: float = Field(default=0.0, ge=0, le=1)
    """Relative jitter in [0, 1]: 0.1 spreads each delay by +/-10 %."""
    reset_after: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """Seconds RUNNING after which the consecutive-restart count resets."""

    def build(self) -> Backoff:
        """The runtime `Backoff` these settings describe."""
        return Backoff(
            initial=self.initial,
            multiplier=self.multiplier,
            max=self.max,
            jitter=self.jitter,
            reset_after=self.reset_after,
        )


class ModuleSettings(_Section):
    """One `[[ledgers.modules]]` entry: which module to run and how to supervise it."""

    use: str
    """The module class: `"package.module:Class"`, or the name of a built-in module or of an
    entry point in the group `nucleus_actors.modules` (a `Module` subclass, built with no
    arguments; it reads its settings from `config`)."""
    id: str | None = None
    """Override the class's module id (to run one class twice in a ledger)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Settings handed to the module as `ctx.config`."""
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    """When the supervisor restarts it: always, only after a crash, or never."""
    shutdown: float = Field(default=5.0, ge=0)
    """Seconds `stop` may take before the module is cancelled; `0` cancels at once without
    calling `stop`; `inf` waits forever."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds each init/start/hook callback may take (expiry is a crash); `inf` = no limit."""
    inbox: int = Field(default=64, ge=1)
    """Capacity of its after_append inbox, in records."""
    overflow: Literal["block", "drop_oldest", "drop_newest", "fail", "catch_up"] | None = None
    """What happens when its inbox is full: slow appends down, drop, crash the module, or
    (durable modules) read the entries back from storage later; unset: `catch_up` for a
    durable module, else `block`."""
    durable: bool = False
    """Deliver every committed entry at least once across restarts, reopens and crashes (the
    module catches up from its cursor); see docs/delivery.md."""
    start_at: Literal["start", "end"] = "start"
    """Where a durable module with no position yet starts on an existing ledger."""
    depends_on: list[str] = Field(default_factory=list)
    """Ids of modules that must start before it (and stop after it)."""
    backoff: BackoffSettings | None = None
    """Restart backoff for this module; unset uses the ledger's."""
    isolation: Literal["task", "process"] = "task"
    """Where its callbacks run: a trio task of the daemon, or a worker process of its own
    per incarnation (see docs/isolation.md)."""
    memory_limit: int | None = Field(default=None, ge=1)
    """`isolation = "process"` only: the worker's address-space limit in bytes."""

    @field_validator("use")
    @classmethod
    def _importable(cls, use: str) -> str:
        try:
            resolve_use(use)
        except ValueError as exc:
            raise PydanticCustomError("module_use", "{reason}", {"reason": str(exc)}) from None
        return use

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else _matching(value, LEDGER_ID_PATTERN, _ID_RULE)

    @model_validator(mode="after")
    def _process_rules(self) -> ModuleSettings:
        if self.memory_limit is not None and self.isolation != "process":
            raise ValueError(
                f'memory_limit = {self.memory_limit} needs isolation = "process" (a module '
                "running as a task shares the daemon's memory)"
            )
        if self.isolation == "process":
            try:
                json.dumps(self.config, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f'isolation = "process" needs a config that is JSON (it is sent to the '
                    f"worker process as JSON; TOML dates and times are not): {exc}"
                ) from None
        return self

    def spec(self, *, instrument: Callable[[Module], None] | None = None) -> ModuleSpec[Module]:
        """The `ModuleSpec` these settings describe (the class is imported again; cached).

        Args:
            instrument: called with every new instance (each incarnation) before the runtime
                sees it; the daemon uses it to time hooks for `/metrics`.

        Raises:
            ValueError: the class no longer resolves, or an option is out of range.
        """
        cls = resolve_use(self.use)
        module_id = self.id

        def make() -> Module:
            module = cls()
            if module_id is not None:
                module.id = module_id
            if instrument is not None:
                instrument(module)
            return module

        make.__qualname__ = f"{cls.__qualname__}.factory"
        make.__wrapped__ = cls  # type: ignore[attr-defined]  # what an isolated worker builds
        # A class that owns its position (resume_after, e.g. jsonl-mirror) is durable by nature.
        durable = self.durable or (isinstance(cls, type) and cls.overrides("resume_after"))
        return ModuleSpec(
            make,
            restart=Restart(self.restart),
            shutdown=None if math.isinf(self.shutdown) else self.shutdown,
            timeout=None if math.isinf(self.timeout) else self.timeout,
            inbox=self.inbox,
            overflow=None if self.overflow is None else Overflow(self.overflow),
            durable=durable,
            start_at=self.start_at,
            depends_on=tuple(self.depends_on),
            config=dict(self.config),
            backoff=None if self.backoff is None else self.backoff.build(),
            isolation=Isolation(self.isolation),
            memory_limit=self.memory_limit,
        )


class LedgerSettings(_Section):
    """One `[[ledgers]]` table: a ledger, its storage, its supervisor and its modules."""

    id: str
    """Ledger id (bound into the genesis hash; the `{ledger}` in API paths)."""
    storage: str = Field(min_length=1)
    """SQLite file of the ledger, relative to the config file's directory (`~` expands), or
    `":memory:"` to keep it in memory only, or a PostgreSQL URI (`postgresql://...`, without
    a password; `postgresql://` alone: libpq defaults and the `PG*` environment)."""
    dsn_file: str | None = None
    """PostgreSQL: a file (relative to the config file's directory) whose first line is the
    connection string to use instead of the one in `storage` (keeps the password out of the
    TOML)."""
    schema_: str | None = Field(default=None, alias="schema")
    """PostgreSQL: the schema holding the ledger (one ledger per schema); unset:
    `nucleus_<id>` (the id's `.` and `-` as `_`)."""
    role: Literal["auto", "writer", "standby"] = "auto"
    """PostgreSQL: `"auto"` writes when it holds the lease and otherwise serves reads as a
    standby, taking over when the lease expires; `"writer"` the same, but `/readyz` answers 503
    until it writes; `"standby"` never writes."""
    lease_timeout: float = Field(default=5.0, ge=0.5, allow_inf_nan=False)
    """PostgreSQL: seconds the writer's lease lasts without renewal (renewed every third of
    it); a standby takes over once it expired."""
    durability: Literal["full", "normal"] = "full"
    """SQLite durability: `"full"` fsyncs every commit (survives power loss); `"normal"` may
    lose the last acknowledged appends on an OS crash or power loss."""
    strategy: Literal["one_for_one", "one_for_all", "rest_for_one"] = "one_for_one"
    """Which modules restart together when one crashes."""
    max_restarts: int = Field(default=3, ge=0)
    """Restart intensity: more than this many restarts ..."""
    restart_window: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """... within this many seconds fails the ledger (see `on_ledger_failure`)."""
    backoff: BackoffSettings | None = None
    """Delay between consecutive restarts of a module; unset restarts at once."""
    max_record_bytes: int = Field(default=1 << 20, ge=64)
    """Largest record accepted, measured on its canonical bytes."""
    cursor_interval: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Seconds a durable module's moved cursor may wait before it is stored on its own."""
    stall_warning: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal[False] = 0.1
    """Seconds a callback of a TASK module may block the event loop before it is logged as a
    stall and counted (`nucleus_module_stalls_total`); `false` turns the watchdog off."""
    verify_on_open: Literal["tail", "full"] = "tail"
    """`"tail"`: opening checks the chain's last entries, then the whole chain is verified in
    the background (metric `nucleus_ledger_verified_entries`); `"full"`: the whole chain is
    verified before the ledger serves (a bad entry stops it from starting)."""
    idempotency_window: float = Field(default=86400.0, gt=0, allow_inf_nan=False)
    """Seconds an `Idempotency-Key` is remembered: a retry with the same key and body within
    it gets the first receipts instead of appending again."""
    modules: list[ModuleSettings] = Field(default_factory=list)
    """The ledger's modules, in start order (after `depends_on`)."""
    checkpoint_key: str | None = None
    """Signer key file (`nucleus keygen`), relative to the config file's directory: the daemon
    signs checkpoints of this ledger with it. Unset: no checkpoints."""
    checkpoint_origin: str | None = None
    """The checkpoints' origin line, which must be the key's name; unset:
    `<hostname>/<ledger id>`."""
    checkpoint_interval: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds between signed checkpoints (one is signed only when the ledger grew)."""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _matching(value, LEDGER_ID_PATTERN, _ID_RULE)

    @field_validator("stall_warning", mode="before")
    @classmethod
    def _stall_warning(cls, value: object) -> object:
        ok = value is False or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
        if not ok:
            raise PydanticCustomError(
                "stall_warning", "must be a number of seconds > 0, or false (off)", {}
            )
        return value

    @field_validator("checkpoint_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is not None and (not value or "+" in value or any(c.isspace() for c in value)):
            raise PydanticCustomError(
                "origin", "must be a non-empty key name without spaces or '+'", {}
            )
        return value

    def checkpoint_key_path(self, base_dir: Path) -> Path | None:
        """The absolute signer key path (relative to `base_dir`), or None when unset."""
        if self.checkpoint_key is None:
            return None
        path = Path(os.path.expanduser(self.checkpoint_key))
        return path if path.is_absolute() else (base_dir / path).resolve()

    @property
    def postgres(self) -> bool:
        """The ledger is stored in PostgreSQL (`storage = "postgresql://..."`)."""
        return self.storage.startswith(("postgresql:", "postgres:"))

    @property
    def pg_schema(self) -> str:
        """The PostgreSQL schema of the ledger (`schema`, or `nucleus_<id>`)."""
        if self.schema_ is not None:
            return self.schema_
        return "nucleus_" + re.sub(r"[^A-Za-z0-9_]", "_", self.id)[:54]

    def dsn(self, base_dir: Path) -> str:
        """The PostgreSQL connection string: `dsn_file`'s first line, else `storage`.

        Raises:
            ValueError: `dsn_file` cannot be read or is empty.
        """
        if self.dsn_file is None:
            return "" if self.storage.rstrip("/") in ("postgresql:", "postgres:") else self.storage
        path = Path(os.path.expanduser(self.dsn_file))
        path = path if path.is_absolute() else (base_dir / path).resolve()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read dsn_file {path}: {exc}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"dsn_file {path} is empty")
        return lines[0].strip()

    @model_validator(mode="after")
    def _postgres_keys(self) -> LedgerSettings:
        if self.postgres:
            if re.match(r"postgres(ql)?://[^/@]*:[^/@]*@", self.storage):
                raise PydanticCustomError(
                    "secret",
                    "storage: the PostgreSQL URI holds a password: keep it out of the TOML "
                    "(dsn_file, PGPASSWORD or ~/.pgpass)",
                    {},
                )
            if self.schema_ is not None and not re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]{0,62}", self.schema_
            ):
                raise PydanticCustomError(
                    "schema",
                    "schema must be 1 to 63 letters, digits and '_', not starting with a "
                    "digit, got '{value}'",
                    {"value": self.schema_},
                )
            return self
        for key, value, unset in (
            ("dsn_file", self.dsn_file, None),
            ("schema", self.schema_, None),
            ("role", self.role, "auto"),
            ("lease_timeout", self.lease_timeout, 5.0),
        ):
            if value != unset:
                raise PydanticCustomError(
                    "postgres_only",
                    "{key} is a PostgreSQL setting; storage '{storage}' is not a postgresql:// URI",
                    {"key": key, "storage": self.storage},
                )
        return self

    def storage_path(self, base_dir: Path) -> Path | None:
        """The absolute SQLite path (relative paths resolve against `base_dir`), or None for
        `":memory:"` and PostgreSQL."""
        if self.storage == MEMORY or self.postgres:
            return None
        path = Path(os.path.expanduser(self.storage))
        return path if path.is_absolute() else (base_dir / path).resolve()

    def ledger_config(self) -> LedgerConfig:
        """The engine's `LedgerConfig` for this ledger."""
        return LedgerConfig(
            ledger_id=self.id,
            strategy=Strategy(self.strategy),
            max_restarts=self.max_restarts,
            restart_window=self.restart_window,
            backoff=None if self.backoff is None else self.backoff.build(),
            max_record_bytes=self.max_record_bytes,
            cursor_interval=self.cursor_interval,
            stall_warning=self.stall_warning or None,
            idempotency_window=self.idempotency_window,
        )


class DaemonConfig(_Section):
    """The whole file: the daemon's HTTP settings and its ledgers."""

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address to listen on (`0.0.0.0` or `::` for every interface)."""
    port: int = Field(default=8470, ge=0, le=65535)
    """TCP port; `0` picks a free one (the log says which)."""
    token_env: str = "NUCLEUS_TOKEN"
    """Environment variable holding the API token; when it is set and not empty, every write
    needs `Authorization: Bearer <token>`."""
    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    """Largest request body accepted; larger ones get 413 before they are parsed."""
    on_ledger_failure: Literal["exit", "serve"] = "exit"
    """When a ledger fails: `"exit"` stops the daemon with a non-zero status (let systemd or
    Kubernetes restart it); `"serve"` keeps serving the other ledgers, the failed one answers
    503."""
    graceful_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Seconds in-flight requests get to finish on shutdown before they are cancelled."""
    allowed_hosts: list[str] | None = None
    """`Host` header values the daemon answers (`name` or `name:port`, `"*"` for any); others
    get 421. Unset: the bind address, `localhost`, `127.0.0.1` and `[::1]`, with the port."""
    read_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Seconds a client has to send a request head (or stay idle between requests), and again
    its whole body; a slower one is closed (408 for a body)."""
    max_connections: int = Field(default=1000, ge=1)
    """Most connections served at once (lowered to fit the open-file limit); at the cap, the
    connection that waited longest without a complete request is closed."""
    max_batch_records: int = Field(default=1000, ge=1)
    """Most records in one batch append (413 beyond)."""
    stall_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """`/readyz` answers 503 for a ledger whose appends have waited this many seconds without
    progress (a hung module holding every append back)."""
    body_budget_bytes: int = Field(default=8 << 20, ge=1 << 16)
    """Bytes of large bodies (over 64 KiB each) read and processed at once; more wait (at
    most `read_timeout`, then 503)."""
    ledgers: list[LedgerSettings] = Field(min_length=1)
    """The ledgers this daemon serves (at least one)."""
    # -- operations (docs/operations.md) ---------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level; `NUCLEUS_LOG_LEVEL` and `--log-level` override it (flag > env > file);
    reloaded on SIGHUP when neither overrides it."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text or JSON; `NUCLEUS_LOG_FORMAT` and `--log-format` override it."""
    access_log: bool = True
    """One INFO line per HTTP request (`--no-access-log` turns it off)."""
    token_file: str | None = None
    """File holding the API token (first line; relative to this file's directory), re-read on
    SIGHUP. Takes precedence over `token_env`."""
    reads: Literal["open", "token"] = "open"
    """`"token"`: reads (`GET /v1/...`, `/metrics`) need a bearer token too: the read token
    or the API token. `/healthz`, `/readyz`, `/docs` and `/openapi.json` stay open."""
    read_token_env: str = "NUCLEUS_READ_TOKEN"
    """Environment variable holding a read-only token (accepted for reads, not writes)."""
    read_token_file: str | None = None
    """File holding the read-only token, re-read on SIGHUP (takes precedence over
    `read_token_env`)."""
    tls_cert: str | None = None
    """PEM certificate (chain) file: with `tls_key`, the daemon serves HTTPS."""
    tls_key: str | None = None
    """PEM private key file of `tls_cert`."""

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        from .guards import HostAllowList  # the web stack only when a config has the key

        if value is not None:
            try:
                HostAllowList(value)
            except ValueError as exc:
                raise PydanticCustomError(
                    "allowed_hosts", "{reason}", {"reason": str(exc)}
                ) from None
        return value

    def http_limits(self) -> HttpLimits:
        """The HTTP limits this configuration sets."""
        from .guards import HttpLimits

        return HttpLimits(
            read_timeout=self.read_timeout,
            max_connections=self.max_connections,
            max_batch_records=self.max_batch_records,
            body_budget_bytes=self.body_budget_bytes,
            stall_timeout=self.stall_timeout,
            allowed_hosts=None if self.allowed_hosts is None else tuple(self.allowed_hosts),
        )

    @field_validator("token_env", "read_token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        return _matching(value, _ENV_RE, "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")

    @property
    def base_dir(self) -> Path:
        """The directory relative storage paths resolve against (the config file's)."""
        return self._base_dir

    def path_of(self, value: str) -> Path:
        """A path key's value, resolved against the config file's directory (`~` expands)."""
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self._base_dir / path

    @model_validator(mode="after")
    def _tls_pair(self) -> DaemonConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise PydanticCustomError(
                "tls_pair", "tls_cert and tls_key go together: set both or neither", {}
            )
        return self

    @model_validator(mode="after")
    def _distinct(self, info: ValidationInfo) -> DaemonConfig:
        base = self._base_dir = _base_dir(info)
        seen: dict[str, int] = {}
        files: dict[Path, int] = {}
        for index, ledger in enumerate(self.ledgers):
            if ledger.id in seen:
                raise PydanticCustomError(
                    "duplicate_ledger",
                    "ledger id '{id}' is used twice: ledgers[{a}] and ledgers[{b}]",
                    {"id": ledger.id, "a": seen[ledger.id], "b": index},
                )
            seen[ledger.id] = index
            path = ledger.storage_path(base)
            if path is None:
                continue
            if path in files:
                raise PydanticCustomError(
                    "duplicate_storage",
                    "ledgers[{a}] and ledgers[{b}] use the same storage file {path}",
                    {"a": files[path], "b": index, "path": str(path)},
                )
            files[path] = index
            if not path.parent.is_dir():
                raise PydanticCustomError(
                    "storage_dir",
                    "ledgers[{i}].storage: directory {dir} does not exist",
                    {"i": index, "dir": str(path.parent)},
                )
        return self


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, Mapping) else {}
    return Path(context.get("base_dir", Path.cwd())).resolve()


# -- loading ---------------------------------------------------------------------------------
def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(data: Any, loc: Sequence[int | str]) -> str:
    """`(ledger 'main', module 'pkg.mod:Class')` for errors inside a ledger, from the raw
    input (what the user wrote, even where it is itself invalid)."""
    notes: list[str] = []
    if len(loc) >= 2 and loc[0] == "ledgers" and isinstance(loc[1], int):
        ledgers = data.get("ledgers") if isinstance(data, dict) else None
        ledger = ledgers[loc[1]] if isinstance(ledgers, list) and loc[1] < len(ledgers) else None
        if isinstance(ledger, dict) and isinstance(ledger.get("id"), str):
            notes.append(f"ledger {ledger['id']!r}")
        if len(loc) >= 4 and loc[2] == "modules" and isinstance(loc[3], int):
            modules = ledger.get("modules") if isinstance(ledger, dict) else None
            if isinstance(modules, list) and loc[3] < len(modules):
                entry = modules[loc[3]]
                if isinstance(entry, dict) and isinstance(entry.get("use"), str):
                    notes.append(f"module {entry['use']!r}")
    return f" ({', '.join(notes)})" if notes else ""


def _short(value: Any) -> str | None:
    if isinstance(value, (dict, list)):
        return None
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problems(error: ValidationError, data: Any) -> list[ConfigProblem]:
    """One `ConfigProblem` per pydantic error, with its path and the offending value."""
    problems = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not allowed here)"
        elif item["type"] not in ("missing", "module_use", "duplicate_ledger") and (
            shown := _short(item.get("input"))
        ):
            message = f"{message} (got {shown})"
        problems.append(ConfigProblem(_format_loc(loc) + _describe(data, loc), message))
    return problems


def parse_config(
    data: Mapping[str, Any], *, base_dir: Path, source: str = "<config>"
) -> DaemonConfig:
    """Validate an already-parsed configuration mapping.

    Args:
        data: the TOML document as a mapping.
        base_dir: the directory relative storage paths resolve against.
        source: how to name the configuration in errors.

    Raises:
        ConfigError: listing every problem with its path.
    """
    try:
        return DaemonConfig.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc, data)) from None


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and validate a TOML configuration file.

    Relative storage paths in the file resolve against its directory (`config.base_dir`).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or breaks a rule (every problem is
            listed with its path).
    """
    where = Path(path)
    source = str(where)
    try:
        raw = where.read_bytes()
    except OSError as exc:
        raise ConfigError(
            source, [ConfigProblem("", f"cannot read the file: {exc.strerror}")]
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"not UTF-8 text: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"not valid TOML: {exc}")]) from None
    return parse_config(data, base_dir=where.resolve().parent, source=source)

"""The `nucleus` command line (needs the daemon extra).

Daemon side: `init`, `check`, `run`, `verify`, `modules`. Client side, against a running
daemon (`--url`, token from `$NUCLEUS_TOKEN`): `status`, `append`, `tail`, `export`.

Exit statuses (docs/cli.md): 0 success; 1 a ledger failed, the server could not listen, a
ledger file or an export does not verify, or the daemon refused or failed a request; 2
unusable input (bad configuration, unreadable file, bad option, invalid record, unknown
ledger); 3 the daemon is unreachable; 4 the daemon refused the token.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from . import __version__, _jcs, _typer_lite
from .daemon.client import (
    DEFAULT_URL,
    EXIT_BAD_INPUT,
    ClientError,
    DaemonClient,
    DaemonUnreachable,
    Reconnecting,
)
from .daemon.template import CONFIG_TEMPLATE
from .daemon.wire import dumps, entry_line, export_header, jsonl_line
from .errors import IntegrityError, InvalidRecord, StorageError, _printable
from .hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from .record import Hash, Record

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as _Progress
    from rich.table import Table as _Table

# Client commands and `--version` must start fast: trio, the server (FastAPI, hypercorn),
# pydantic, httpx and most of rich are imported where a command needs them, not here (a test
# checks `sys.modules` after a client command).
_typer_lite.install()  # typer would import pydantic to coerce every option: see _typer_lite

EXIT_FAILURE = 1
"""Same as `daemon.server.EXIT_FAILURE` (a test checks)."""
EXIT_CONFIG = 2
"""Same as `daemon.server.EXIT_CONFIG` (a test checks)."""


def escape(text: str) -> str:
    """`rich.markup.escape`, imported on first use."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def Progress(*columns: Any, **options: Any) -> _Progress:
    """`rich.progress.Progress`, imported on first use."""
    from rich.progress import Progress as RichProgress

    return RichProgress(*columns, **options)


def _column(name: str) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        import rich.progress

        return getattr(rich.progress, name)(*args, **kwargs)

    make.__name__ = name
    return make


BarColumn = _column("BarColumn")
MofNCompleteColumn = _column("MofNCompleteColumn")
TextColumn = _column("TextColumn")
TimeElapsedColumn = _column("TimeElapsedColumn")
TimeRemainingColumn = _column("TimeRemainingColumn")


def Table(*args: Any, **kwargs: Any) -> _Table:
    """`rich.table.Table`, imported on first use."""
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


class _LazyConsole:
    """A `rich.console.Console` created on first use."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def real(self) -> Console:
        """The console itself (where rich wants a `Console`, e.g. `Progress(console=...)`)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


__all__ = ["app", "main"]

app = typer.Typer(
    name="nucleus",
    help="Run and inspect nucleus_actors ledgers: blake3-chained append-only logs with "
    "supervised modules.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_out: Any = _LazyConsole(highlight=False, soft_wrap=True)
_err: Any = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


class LogFormat(enum.StrEnum):
    """How `nucleus run` writes its log lines."""

    text = "text"
    json = "json"


def _error(message: str) -> None:
    _err.print(f"error: {message}", markup=False, style="bold red")


def _integrity_failure(where: object, exc: IntegrityError) -> NoReturn:
    """Exit 1: the entry at `exc.seq` of `where` (a file, a schema) does not verify."""
    _error(f"{where}: integrity failure at seq {exc.seq}: {exc}")
    raise typer.Exit(EXIT_FAILURE) from None


def _version(value: bool) -> None:
    if value:
        print(f"nucleus_actors {__version__}")  # not rich: `--version` must start fast
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Run and inspect nucleus_actors ledgers."""


@app.command()
def init(
    directory: Annotated[
        Path, typer.Argument(help="Where to write nucleus.toml (created if missing).")
    ] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented nucleus.toml: one SQLite ledger in DIRECTORY and two modules."""
    target = directory / "nucleus.toml"
    if target.exists() and not force:
        _error(f"{target} exists (use --force to overwrite it)")
        raise typer.Exit(EXIT_FAILURE)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target.write_text(CONFIG_TEMPLATE, encoding="utf-8")
    except OSError as exc:
        _error(f"cannot write {target}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    _out.print(f"wrote {target}\nstart the daemon with: nucleus run {target}", markup=False)


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="The daemon's TOML configuration file.")],
) -> None:
    """Validate a configuration (imports and builds every module, starts nothing)."""
    from .daemon.config import ConfigError, load_config
    from .daemon.server import Daemon

    try:
        settings = load_config(config)
        Daemon(settings)
    except ConfigError as exc:
        _err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_CONFIG) from None
    for ledger in settings.ledgers:
        path = ledger.storage_path(settings.base_dir)
        modules = ", ".join(m.id or m.use for m in ledger.modules) or "no modules"
        where = "in memory" if path is None else str(path)
        if ledger.postgres:
            where = f"PostgreSQL schema {ledger.pg_schema} ({ledger.role})"
        _out.print(f"ledger {ledger.id!r}: {where}; {modules}", markup=False)
    _out.print(f"{config}: ok", markup=False)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="The daemon's TOML configuration file.")],
    host: Annotated[
        str | None, typer.Option("--host", help="Listen address (overrides the file).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", min=0, max=65535, help="Listen port (overrides the file); 0 picks one."
        ),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option("--log-format", help="Log lines as text or JSON (overrides the file)."),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="debug, info, warning or error (overrides the file)."),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            help="One log line per HTTP request (overrides the file's access_log).",
        ),
    ] = None,
    accept_rollback: Annotated[
        bool,
        typer.Option(
            "--accept-rollback",
            help="Start even if a ledger is behind (or diverges from) the last checkpoint "
            "its key signed, e.g. after restoring a backup on purpose.",
        ),
    ] = False,
) -> None:
    """Run the ledger daemon: every ledger of CONFIG behind the HTTP/JSON API.

    Logs "listening on http://HOST:PORT" once bound. SIGTERM or SIGINT shuts down
    gracefully (in-flight requests finish, every module's stop runs) and exits 0; a second
    signal forces exit. SIGHUP reloads the log level, the token files and module configs
    (docs/operations.md). Exits 1 when a ledger fails (on_ledger_failure = "exit"), 2 on a
    configuration error. `$NUCLEUS_HOST`, `$NUCLEUS_PORT`, `$NUCLEUS_LOG_LEVEL` and
    `$NUCLEUS_LOG_FORMAT` override the file; options override both.
    """
    import trio

    from .daemon.config import ConfigError, load_config
    from .daemon.logs import configure_logging
    from .daemon.server import Daemon

    try:
        settings = load_config(config)
    except ConfigError as exc:
        _err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_CONFIG) from None
    env = os.environ
    host = host or env.get("NUCLEUS_HOST") or None
    if port is None and env.get("NUCLEUS_PORT"):
        text = env["NUCLEUS_PORT"]
        if not text.isdigit() or int(text) > 65535:
            _error(f"$NUCLEUS_PORT must be a port number (0..65535), got {text!r}")
            raise typer.Exit(EXIT_CONFIG)
        port = int(text)
    level_name = log_level or env.get("NUCLEUS_LOG_LEVEL") or settings.log_level
    level = logging.getLevelNamesMapping().get(level_name.upper())
    if level is None or level_name.lower() not in ("debug", "info", "warning", "error"):
        where = "--log-level" if log_level else "$NUCLEUS_LOG_LEVEL"
        _error(f"{where} must be debug, info, warning or error, got {level_name!r}")
        raise typer.Exit(EXIT_CONFIG)
    format_name = (
        log_format.value if log_format else env.get("NUCLEUS_LOG_FORMAT") or settings.log_format
    )
    if format_name not in ("text", "json"):
        _error(f"$NUCLEUS_LOG_FORMAT must be text or json, got {format_name!r}")
        raise typer.Exit(EXIT_CONFIG)
    access = settings.access_log if access_log is None else access_log
    configure_logging("json" if format_name == "json" else "text", level, access_log=access)
    try:
        daemon = Daemon(
            settings,
            host=host,
            port=port,
            config_path=config,
            log_level_fixed=bool(log_level or env.get("NUCLEUS_LOG_LEVEL")),
            access_log=access,
            accept_rollback=accept_rollback,
        )
    except ConfigError as exc:
        _err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_CONFIG) from None
    raise typer.Exit(trio.run(daemon.run))


@app.command()
def verify(
    target: Annotated[
        str,
        typer.Argument(
            help="A SQLite ledger file, or a PostgreSQL URI (postgresql://...) with --schema.",
            metavar="PATH",
        ),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="A signed checkpoint (note file) the file must match."),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", help="The checkpoint's verifier key (the string, or a file)."),
    ] = None,
    schema: Annotated[
        str, typer.Option("--schema", help="PostgreSQL: the ledger's schema.")
    ] = "nucleus",
) -> None:
    """Verify a ledger file's whole hash chain (safe beside a running daemon).

    `PATH` may also be a PostgreSQL URI (`postgresql://user@host/db`, the password from
    `PGPASSWORD` or `~/.pgpass`; `postgresql://` alone: the `PG*` variables) with `--schema`:
    the chain stored there is verified the same way, read-only.

    With `--checkpoint NOTE --key VKEY` it also checks the checkpoint's signature and that the
    file's Merkle root and chain head at the checkpoint's size are the signed ones.

    Exits 0 when it verifies, 1 on an integrity failure (naming the first bad seq) or a
    checkpoint that does not match, 2 when the file is missing or not a ledger file, or the
    checkpoint or key cannot be read.
    """
    if (checkpoint is None) != (key is None):
        _error("--checkpoint and --key go together")
        raise typer.Exit(EXIT_CONFIG)
    if target.startswith(("postgresql:", "postgres:")):
        if checkpoint is not None:
            _error("--checkpoint applies to SQLite files only")
            raise typer.Exit(EXIT_CONFIG)
        _verify_postgres(target, schema)
        return
    path = Path(target)

    import trio

    from .storage import verify_file

    columns = (
        TextColumn("verifying {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_err.real, transient=False) as progress:
        task = progress.add_task(str(path), total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            length, head = trio.run(partial(verify_file, path, progress=report))
        except IntegrityError as exc:
            progress.stop()
            _integrity_failure(path, exc)
        except StorageError as exc:
            progress.stop()
            _error(f"{path}: {exc}")
            raise typer.Exit(EXIT_CONFIG) from None
    entries = "entry" if length == 1 else "entries"
    _out.print(f"{path}: ok, {length} {entries}, head {head.hex()}", markup=False)
    if checkpoint is not None and key is not None:
        _out.print(_verify_checkpoint_file(path, checkpoint, key, length), markup=False)


def _verify_postgres(dsn: str, schema: str) -> None:
    """`nucleus verify postgresql://... --schema S` (exit 1 on an integrity failure, 2 when
    the database cannot be read as a ledger)."""
    import trio

    from .storage.postgres import redact, verify_schema

    where = f"{redact(dsn)} schema {schema}"
    try:
        ledger_id, length, head = trio.run(
            partial(
                verify_schema,
                None if dsn.rstrip("/") in ("postgresql:", "postgres:") else dsn,
                schema=schema,
            )
        )
    except IntegrityError as exc:
        _integrity_failure(where, exc)
    except StorageError as exc:
        _error(f"{exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    entries = "entry" if length == 1 else "entries"
    _out.print(
        f"{where}: ledger {ledger_id!r} ok, {length} {entries}, head {head.hex()}", markup=False
    )


def _verifier_key(key: str) -> Any:
    """A `VerifierKey` from its string or from a file holding it (exit 2 if unusable)."""
    from .checkpoint import VerifierKey
    from .errors import ProofError

    text = key
    candidate = Path(key)
    if "+" not in key or candidate.is_file():
        try:
            text = candidate.read_text(encoding="utf-8").strip()
        except OSError as exc:
            _error(f"--key {key!r} is neither a verifier key nor a readable file: {exc}")
            raise typer.Exit(EXIT_CONFIG) from None
    try:
        return VerifierKey.parse(text)
    except ProofError as exc:
        _error(f"--key: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None


def _read_note(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _error(f"cannot read the checkpoint {path}: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None


def _checked_checkpoint(note: str, verifier: Any, what: str) -> Any:
    from .checkpoint import Checkpoint
    from .errors import ProofError

    try:
        return Checkpoint.verify(note, verifier)
    except ProofError as exc:
        _error(f"{what} does not verify: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None


def _verify_checkpoint_file(path: Path, note_path: Path, key: str, length: int) -> str:
    """Check a verified ledger file against a signed checkpoint; the line to print."""
    import sqlite3

    from ._tree import TreeEdge
    from .proofs import BLAKE3

    checkpoint = _checked_checkpoint(_read_note(note_path), _verifier_key(key), str(note_path))
    size = checkpoint.size
    if size > length:
        _error(f"{path}: the checkpoint covers {size} entries, the file holds {length}")
        raise typer.Exit(EXIT_FAILURE)
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            ledger_id = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
            edge, start = TreeEdge(), 0
            while start < size:
                rows = conn.execute(
                    "SELECT canonical FROM entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (start, min(size, start + 65536)),
                ).fetchall()
                if not rows:
                    break
                _, edge = edge.extended([BLAKE3.leaf(row[0]) for row in rows])
                start += len(rows)
            last = conn.execute("SELECT hash FROM entries WHERE seq = ?", (size - 1,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        _error(f"{path}: cannot read it for the checkpoint: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    chain = genesis(ledger_id[0]) if size == 0 else Hash(last[0])
    root = edge.root()
    if edge.size != size or root != checkpoint.root:
        _error(
            f"{path}: Merkle root at size {size} is {root.hex()}, the checkpoint signs "
            f"{checkpoint.root.hex()}"
        )
        raise typer.Exit(EXIT_FAILURE)
    if checkpoint.chain is not None and chain != checkpoint.chain:
        _error(
            f"{path}: chain head at size {size} is {chain.hex()}, the checkpoint signs "
            f"{checkpoint.chain.hex()}"
        )
        raise typer.Exit(EXIT_FAILURE)
    return (
        f"{path}: matches checkpoint {checkpoint.origin!r} at size {size} "
        f"(root {root.hex()}, chain {chain.hex()})"
    )


@app.command()
def keygen(
    name: Annotated[
        str, typer.Argument(help="Key name: the checkpoint origin, e.g. HOSTNAME/LEDGER.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Key file to write (default: NAME with / as _, .key)."),
    ] = None,
) -> None:
    """Create a checkpoint signer key: writes the key file (mode 0600), prints the verifier key.

    Point a ledger's `checkpoint_key` at the file; publish the printed verifier key
    (`name+keyid+base64`) so that anyone can check the daemon's checkpoints. Refuses to
    overwrite a file (exit 2).
    """
    from .checkpoint import SignerKey
    from .daemon.checkpoints import write_key_file
    from .errors import ProofError

    try:
        key = SignerKey.generate(name)
    except ProofError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    path = out if out is not None else Path(name.replace("/", "_") + ".key")
    try:
        write_key_file(path, key)
    except OSError as exc:
        _error(f"cannot write the key file {path}: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    _out.print(str(key.verifier()), markup=False)
    _err.print(f"wrote signer key {path} (mode 0600): keep it secret", markup=False)


# -- backup and restore ----------------------------------------------------------------------
@app.command()
def backup(
    src: Annotated[Path, typer.Argument(help="A SQLite ledger file (may be in use).")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy (must not exist).")],
) -> None:
    """Copy a ledger file consistently, even while a daemon appends to it, and verify it.

    Uses SQLite's online backup API (one snapshot; the writer is never blocked), writes
    DEST.partial, verifies the whole chain of the copy, then renames it to DEST. Exits 0 with
    the copy's length and head, 1 if the copy does not verify, 2 on unusable input.
    """
    import trio

    from .daemon.backup import BackupError
    from .daemon.backup import backup as run_backup

    try:
        done = trio.run(run_backup, src, dest)
    except IntegrityError as exc:
        _error(f"{src}: the copy does not verify at seq {exc.seq}: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    except (BackupError, StorageError) as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    _out.print(
        f"{dest}: ledger {done.ledger_id!r}, {done.length} entries, head {done.head.hex()} "
        "(verified)",
        markup=False,
    )


@app.command()
def restore(
    export_file: Annotated[Path, typer.Argument(metavar="EXPORT", help="An export (JSONL).")],
    dest: Annotated[Path, typer.Argument(help="The ledger file to create (must not exist).")],
    ledger: Annotated[
        str | None,
        typer.Option("--ledger", "-l", help="Refuse an export of any other ledger."),
    ] = None,
) -> None:
    """Rebuild a SQLite ledger file from an export, verifying every hash.

    The export must start with its header line and hold the whole ledger (from seq 0): a
    slice is refused, as is an export of another ledger than `--ledger`. Every entry's chain
    hash is recomputed from its canonical bytes. Exits 0, 1 if an entry does not verify
    (naming its seq), 2 on unusable input. Serve the file with `nucleus run`.
    """
    import trio

    from .daemon.backup import BackupError
    from .daemon.backup import restore as run_restore

    try:
        with export_file.open("rb") as source:
            done = trio.run(partial(run_restore, source, dest, ledger_id=ledger))
    except OSError as exc:
        _error(f"cannot read {export_file}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    except IntegrityError as exc:
        _integrity_failure(export_file, exc)
    except (BackupError, StorageError) as exc:
        _error(f"{export_file}: {exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    _out.print(
        f"{dest}: ledger {done.ledger_id!r}, {done.length} entries, head {done.head.hex()} "
        "(every hash verified)",
        markup=False,
    )


# -- discovery -------------------------------------------------------------------------------
@app.command("modules")
def list_modules(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the modules a configuration can name in `use`: built-ins and installed entry points.

    Each is imported to read its class version; one that does not import is listed with the
    error and the command exits 1. Run it with the daemon's Python environment.
    """
    from .daemon.discovery import installed_modules

    rows: list[dict[str, Any]] = []
    broken = 0
    for found in installed_modules():
        row: dict[str, Any] = {
            "name": found.name,
            "target": found.target,
            "distribution": found.distribution,
            "distribution_version": found.distribution_version,
            "builtin": found.builtin,
            "shadowed": found.shadowed,
            "module_id": None,
            "module_version": None,
            "error": None,
        }
        try:
            cls = found.load()
        except ValueError as exc:
            broken += 1
            row["error"] = str(exc)
        else:
            row["module_id"] = getattr(cls, "id", None)
            row["module_version"] = str(getattr(cls, "version", "0.0.0"))
        rows.append(row)
    if as_json:
        _out.print(dumps({"modules": rows}), markup=False)
    else:
        lines = [("name", "version", "from", "class")]
        notes = []
        for row, found in zip(rows, installed_modules(), strict=True):
            lines.append((row["name"], row["module_version"] or "?", found.origin, row["target"]))
            if row["error"]:
                notes.append(f"[red]{escape(row['name'])}: cannot load: {escape(row['error'])}[/]")
            elif row["shadowed"]:
                notes.append(
                    f"[yellow]{escape(row['name'])} ({escape(found.origin)}): shadowed by the "
                    "built-in of the same name, cannot be used by name[/]"
                )
        widths = [max(len(line[i]) for line in lines) for i in range(3)]
        for line in lines:
            cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            _out.print("  ".join([*cells, line[3]]), markup=False)
        for note in notes:
            _out.print(note)
    if broken:
        raise typer.Exit(EXIT_FAILURE)


# -- client commands -------------------------------------------------------------------------
Url = Annotated[
    str,
    typer.Option("--url", envvar="NUCLEUS_URL", help="The daemon's base URL."),
]
TokenEnv = Annotated[
    str,
    typer.Option(
        "--token-env",
        help="Environment variable holding the API token (the daemon's `token_env`).",
    ),
]
LedgerOpt = Annotated[
    str | None,
    typer.Option(
        "--ledger", "-l", help="Ledger id (default: the daemon's only ledger, if it has one)."
    ),
]


def _client(url: str, token_env: str) -> DaemonClient:
    return DaemonClient(url, token=os.environ.get(token_env) or None, token_env=token_env)


def _fail(exc: ClientError) -> typer.Exit:
    _error(str(exc))
    return typer.Exit(exc.exit_code)


def _phase_style(phase: str) -> str:
    return {"running": "green", "failed": "bold red"}.get(phase, "yellow")


def _info_text(info: Any) -> str:
    if not isinstance(info, dict):
        return ""
    parts = []
    for key, value in info.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in value.items())
            parts.append(f"{key}: {inner}" if inner else f"{key}: -")
        elif isinstance(value, list):
            parts.append(f"{key}: {', '.join(map(str, value)) or '-'}")
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts)


@app.command()
def status(
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show the daemon's ledgers (phase, length, head) and each ledger's modules.

    Modules that report something (`describe()`, e.g. kind-counter's counts) show it in the
    info column. Exits 1 when a ledger is not running or a module is not running.
    """
    try:
        with _client(url, token_env) as api:
            ids = [ledger] if ledger is not None else [str(x["id"]) for x in api.ledgers()]
            report = [{**api.head(i), "modules": api.modules(i)} for i in ids]
    except ClientError as exc:
        raise _fail(exc) from None
    healthy = all(
        item["phase"] == "running" and all(m["state"] == "running" for m in item["modules"])
        for item in report
    )
    if as_json:
        _out.print(dumps({"url": url, "ledgers": report}), markup=False)
    else:
        _out.print(f"daemon {escape(url)}: {len(report)} ledger(s)")
        for item in report:
            style = _phase_style(item["phase"])
            _out.print(
                f"\nledger [bold]{escape(item['ledger'])}[/bold]: [{style}]{item['phase']}"
                f"[/{style}], {item['length']} entries, head {item['head']}"
                + (
                    f", {escape(str(item['role']))} at epoch {item.get('epoch')}"
                    if item.get("role")
                    else ""
                )
            )
            if not item["modules"]:
                _out.print("  no modules")
                continue
            table = Table(show_edge=False, pad_edge=False, box=None)
            for column in (
                "module", "version", "state", "restarts", "crashes", "inbox", "processed",
                "dropped", "lag",
            ):  # fmt: skip
                table.add_column(column, no_wrap=True)
            notes = []
            for m in item["modules"]:
                mstyle = _phase_style(m["state"])
                table.add_row(
                    escape(m["id"]),
                    escape(m["version"]),
                    f"[{mstyle}]{m['state']}[/{mstyle}]",
                    str(m["restarts"]),
                    str(m["crashes"]),
                    str(m["inbox_depth"]),
                    str(m["processed"]),
                    str(m["dropped"]),
                    str(m.get("lag", 0)),
                )
                if m.get("pid") is not None:
                    notes.append(
                        f'  {escape(m["id"])}: worker pid {m["pid"]} (isolation = "process"), '
                        f"{m['restarts']} restart(s)"
                    )
                if info := _info_text(m.get("info")):
                    notes.append(f"  {escape(m['id'])}: {escape(info)}")
                if m.get("stalls"):
                    notes.append(
                        f"  {escape(m['id'])}: [yellow]blocked the event loop {m['stalls']} "
                        'time(s) (stall_warning; isolation = "process" fixes it)[/yellow]'
                    )
                if m.get("last_error"):
                    notes.append(
                        f"  {escape(m['id'])}: [red]last error: {escape(m['last_error'])}[/red]"
                    )
            _out.print(table)
            for note in notes:
                _out.print(note)
    if not healthy:
        raise typer.Exit(EXIT_FAILURE)


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _error(f"--meta must be KEY=VALUE, got {item!r}")
            raise typer.Exit(EXIT_CONFIG)
        meta[key] = value
    return meta


def _stdin_lines(
    stream: IO[bytes],
    kind: str | None,
    meta: dict[str, str],
    problems: dict[int, str],
    key_prefix: str | None = None,
) -> Iterator[bytes]:
    """NDJSON chunks for the stream route, one output line per stdin line (so the daemon's
    line numbers are stdin's), read as they come (a pipe need not end).

    A line the daemon could never take (not JSON with `--kind`; not a record object without
    it) is noted in `problems` and sent as a blank line (which the daemon skips). With
    `key_prefix`, line N carries `"idempotency_key": key_prefix + str(N)` (unless it has its
    own), so a re-run with the same prefix appends each line at most once.
    """
    read = getattr(stream, "read1", stream.read)
    number = 0
    pending = b""
    while True:
        block = read(1 << 16)
        if not block:
            break
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        out = []
        for raw in lines:
            number += 1
            out.append(_stdin_line(number, raw, kind, meta, problems, key_prefix))
        yield b"".join(out)
    if pending.strip():
        yield _stdin_line(number + 1, pending, kind, meta, problems, key_prefix)


def _stdin_line(
    number: int,
    raw: bytes,
    kind: str | None,
    meta: dict[str, str],
    problems: dict[int, str],
    key_prefix: str | None = None,
) -> bytes:
    if not raw.strip():
        return b"\n"
    if kind is None and not meta and key_prefix is None:
        return raw.rstrip(b"\r") + b"\n"  # a whole record: the daemon checks it
    try:
        value = _jcs.loads(raw)
    except RecursionError:
        problems[number] = "JSON nests too deeply to parse"
        return b"\n"
    except ValueError as exc:
        problems[number] = f"not JSON: {exc}"
        return b"\n"
    if kind is not None:
        record: Any = {"kind": kind, "payload": value, "meta": meta}
    elif not isinstance(value, dict) or "kind" not in value or "payload" not in value:
        problems[number] = (
            'without --kind each line must be an object with "kind" and "payload" (and '
            f'optional "meta"), got {raw.decode(errors="replace").strip()[:80]!r}'
        )
        return b"\n"
    else:
        record = dict(value)
        if meta:
            extra = value.get("meta", {})
            record["meta"] = {**meta, **extra} if isinstance(extra, dict) else extra
    if key_prefix is not None:
        record.setdefault("idempotency_key", f"{key_prefix}{number}")
    return dumps(record).encode() + b"\n"


def _stdin_records(
    stream: IO[str], kind: str | None, meta: dict[str, str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, record)` for each non-blank line of JSON Lines input.

    Each record is validated here as the daemon would (JSON, I-JSON, `Record` rules), so bad
    input is refused with its line number before anything of its batch is sent.
    """
    lines = iter(stream)
    number = 0
    while True:
        number += 1
        try:
            line = next(lines)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"stdin line {number}: not UTF-8 text ({exc.reason})") from None
        if not line.strip():
            continue
        value = _parse_json(line, f"stdin line {number}")
        if kind is not None:
            record = {"kind": kind, "payload": value, "meta": meta}
        elif not isinstance(value, dict) or "kind" not in value or "payload" not in value:
            raise InvalidRecord(
                f"stdin line {number}: without --kind each line must be an object with "
                f'"kind" and "payload" (and optional "meta"), got {line.strip()[:80]!r}'
            )
        else:
            record = {**value, "meta": {**meta, **(value.get("meta") or {})}}
        _validate(record, f"stdin line {number}")
        yield number, record


def _parse_json(text: str, where: str) -> Any:
    """`text` parsed as I-JSON (duplicate member names refused).

    Raises:
        InvalidRecord: naming `where`, for text that is not JSON or nests too deeply.
    """
    try:
        return _jcs.loads(text)
    except RecursionError:
        raise InvalidRecord(f"{where}: JSON nests too deeply to parse") from None
    except ValueError as exc:
        raise InvalidRecord(f"{where}: not JSON: {exc}") from None


def _validate(record: Any, where: str) -> None:
    """Check a record object by the rules the daemon applies (kind, payload, meta).

    Raises:
        InvalidRecord: naming `where` and the broken rule.
    """
    try:
        if not isinstance(record, dict) or not isinstance(record.get("meta", {}), dict):
            raise InvalidRecord('a record is an object {"kind", "payload", "meta"}')
        Record(record.get("kind"), record.get("payload"), record.get("meta") or {})  # type: ignore[arg-type]
    except InvalidRecord as exc:
        raise InvalidRecord(f"{where}: {exc}") from None


@app.command()
def append(
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help="The record kind (e.g. order.created).")
    ] = None,
    payload: Annotated[
        str | None,
        typer.Option("--json", "-j", help="The payload, as JSON (else read stdin)."),
    ] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", "-m", help="KEY=VALUE metadata (repeatable).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", hidden=True, help="Ignored: stdin is streamed."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Show records/s and the count on stderr (default: when it is a terminal).",
        ),
    ] = None,
    idempotency_prefix: Annotated[
        str | None,
        typer.Option(
            "--idempotency-prefix",
            help="Give stdin line N the idempotency key PREFIX+N: re-running the same input "
            "with the same prefix (after a cut) appends every line at most once.",
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
) -> None:
    """Append a record (`--kind K --json PAYLOAD`), or many from stdin as JSON Lines.

    From stdin, each line is a payload (with `--kind`) or a whole record
    `{"kind", "payload", "meta"}`. Lines are streamed to the daemon as they are read and
    appended one by one; each receipt (`{"line","seq","hash","timestamp"}`) goes to stdout as
    soon as its record is durable. A refused line (not JSON, invalid, vetoed) is reported on
    stderr with its line number and the others go on; the exit status is then 2 (bad input)
    or 1 (refused by a module or the daemon).

    With `--idempotency-prefix P`, line N is sent with the idempotency key `P` + `N`: if the
    stream is cut (network, daemon restart), run the same command on the same input again;
    lines already appended answer their first receipt (`"replayed": true`) instead of being
    appended twice (within the daemon's `idempotency_window`).
    """
    del batch_size  # accepted for old scripts; stdin is streamed record by record
    extra = _parse_meta(meta or [])
    if idempotency_prefix is not None and not (
        len(idempotency_prefix) <= 240 and all(" " < c <= "~" for c in idempotency_prefix)
    ):
        _error(
            "--idempotency-prefix must be at most 240 printable ASCII characters (no spaces), "
            f"got {idempotency_prefix!r}"
        )
        raise typer.Exit(EXIT_CONFIG)
    single: dict[str, Any] | None = None
    if payload is not None:  # checked before the daemon is contacted: bad input exits 2
        if kind is None:
            _error("--json needs --kind")
            raise typer.Exit(EXIT_CONFIG)
        try:
            single = {"kind": kind, "payload": _parse_json(payload, "--json"), "meta": extra}
            _validate(single, "--json")
        except InvalidRecord as exc:
            _error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        with _client(url, token_env) as api:
            target = api.pick_ledger(ledger)
            if single is not None:
                receipt = api.append(target, single)
                _out.print(dumps(receipt), markup=False)
                return
            if sys.stdin.isatty():
                _error("give --kind K --json PAYLOAD, or pipe JSON Lines records on stdin")
                raise typer.Exit(EXIT_CONFIG)
            _append_stdin(api, target, kind, extra, progress, idempotency_prefix)
    except ClientError as exc:
        raise _fail(exc) from None


def _append_stdin(
    api: DaemonClient,
    ledger: str,
    kind: str | None,
    meta: dict[str, str],
    progress: bool | None,
    key_prefix: str | None = None,
) -> None:
    """Stream stdin to the daemon's NDJSON route; receipts to stdout as they come back."""
    from .daemon.upload import UploadError, upload_ndjson

    problems: dict[int, str] = {}  # refused before sending: line -> why
    seqs: list[int] = []
    replayed = [0]  # receipts of lines an earlier run appended (idempotency keys)
    failed = [0]
    worst = [0]  # exit status: 2 for bad input, else 1 when something failed
    show = _err.is_terminal if progress is None else progress
    columns = (
        TextColumn(f"appending to {escape(ledger)}"),
        TextColumn("{task.completed:,.0f} records"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )

    def report(number: int, message: str, bad_input: bool) -> None:
        failed[0] += 1
        worst[0] = max(worst[0], EXIT_BAD_INPUT if bad_input else EXIT_FAILURE)
        _error(_printable(f"stdin line {number}: {message}"))  # one line, whatever it holds

    def flush_problems(upto: float) -> None:
        for number in sorted(n for n in problems if n < upto):
            report(number, problems.pop(number), bad_input=True)

    with Progress(*columns, console=_err.real, disable=not show, transient=True) as bar:
        task = bar.add_task("append", total=None, rate="")
        started = time.monotonic()

        def on_line(answer: dict[str, Any]) -> None:
            line = answer.get("line")
            if isinstance(line, int):
                flush_problems(line)
            if "seq" in answer:
                seqs.append(answer["seq"])
                replayed[0] += answer.get("replayed") is True
                sys.stdout.write(dumps(answer) + "\n")  # not rich: one line per record
                elapsed = max(time.monotonic() - started, 1e-6)
                bar.update(task, completed=len(seqs), rate=f"{len(seqs) / elapsed:,.0f}/s")
            elif "summary" in answer:
                flush_problems(float("inf"))
            else:
                status = int(answer.get("status", 0))
                report(int(line or 0), str(answer.get("detail", answer)), status in _BAD_INPUT)

        headers = {"User-Agent": "nucleus-cli"}
        if api.token:
            headers["Authorization"] = f"Bearer {api.token}"
        try:
            upload_ndjson(
                api.url,
                f"/v1/ledgers/{ledger}/records/stream",
                _stdin_lines(sys.stdin.buffer, kind, meta, problems, key_prefix),
                on_line,
                headers=headers,
            )
        except UploadError as exc:
            if exc.status:
                raise api.error_from(exc.status, exc.headers, exc.body) from None
            raise DaemonUnreachable(
                f"cannot reach the daemon at {api.url}: {exc}; is `nucleus run` running there? "
                "(set the address with --url or $NUCLEUS_URL)"
            ) from None
    flush_problems(float("inf"))
    done = f"seqs {min(seqs)}..{max(seqs)}" if seqs else "nothing appended"
    if replayed[0]:
        done += f"; {replayed[0]} of them appended by an earlier run (replayed)"
    if failed[0]:
        _err.print(
            f"appended {len(seqs)} record(s) to {ledger!r} ({done}); {failed[0]} line(s) "
            "failed (each error above names its line)",
            markup=False,
        )
        raise typer.Exit(worst[0])
    if seqs:
        _err.print(f"appended {len(seqs)} record(s) to {ledger!r}: {done}", markup=False)
    else:
        _err.print("stdin held no records: nothing appended", markup=False)


_BAD_INPUT = frozenset({400, 413, 415, 422})


class TailFormat(enum.StrEnum):
    """How `nucleus tail` prints entries."""

    jsonl = "jsonl"
    text = "text"


def _print_entry(entry: dict[str, Any], style: TailFormat) -> None:
    if style is TailFormat.jsonl:
        _out.print(jsonl_line(entry).decode().rstrip("\n"), markup=False)
        return
    when = datetime.fromtimestamp(entry["timestamp"] / 1e6, UTC).isoformat(timespec="milliseconds")
    meta = f" {dumps(entry['meta'])}" if entry.get("meta") else ""
    line = f"{entry['seq']:>8} {when} {entry['kind']} {dumps(entry['payload'])}{meta}"
    _out.print(line, markup=False)


@app.command()
def tail(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new entries as they commit.")
    ] = False,
    from_seq: Annotated[
        int | None, typer.Option("--from", min=0, help="First seq (default: the last -n).")
    ] = None,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=0, help="Without --from: the last N entries.")
    ] = 10,
    output: Annotated[
        TailFormat, typer.Option("--format", help="jsonl (one entry per line) or text.")
    ] = TailFormat.jsonl,
    give_up_after: Annotated[
        float | None,
        typer.Option(
            "--give-up-after",
            min=0,
            help="With --follow: exit 3 after this many seconds without the daemon "
            "(default: keep retrying).",
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
) -> None:
    """Print a ledger's last entries; with `--follow`, keep printing new ones (SSE).

    With `--follow`, a dropped connection (the daemon restarted, the network failed) is
    retried with backoff and resumes right after the last entry printed: nothing is skipped or
    printed twice. Stop it with Ctrl-C (exit 130). If the ledger fails, it exits 1.
    """
    try:
        with _client(url, token_env) as api:
            target = api.pick_ledger(ledger)
            length = int(api.head(target)["length"])
            start = max(0, length - lines) if from_seq is None else from_seq
            if not follow:
                for entry in api.entries(target, start, length):
                    _print_entry(entry, output)
                return

            def reconnecting(event: Reconnecting) -> None:
                _err.print(
                    f"stream interrupted ({event.reason}); resuming from seq {event.next_seq} "
                    f"in {event.delay:.1f} s",
                    markup=False,
                    style="yellow",
                )

            entries = api.follow(
                target, start, on_reconnect=reconnecting, give_up_after=give_up_after
            )
            for entry in entries:
                _print_entry(entry, output)
                sys.stdout.flush()
    except ClientError as exc:
        raise _fail(exc) from None


class ExportFormat(enum.StrEnum):
    """What `nucleus export` writes."""

    jsonl = "jsonl"


@app.command()
def export(
    export_format: Annotated[
        ExportFormat,
        typer.Option("--format", help="jsonl: one entry per line, as the API serves it."),
    ] = ExportFormat.jsonl,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here (default: stdout)."),
    ] = None,
    from_seq: Annotated[int, typer.Option("--from", min=0, help="First seq.")] = 0,
    to_seq: Annotated[
        int | None, typer.Option("--to", min=0, help="Stop before this seq (default: the head).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Recompute every entry's chain hash while exporting.",
        ),
    ] = True,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")
    ] = True,
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
) -> None:
    """Export a ledger's entries as JSON Lines, with a progress bar.

    Exports `[--from, --to)` as the ledger stands when the command starts (entries appended
    meanwhile are left for the next export). The first line is a header `{"nucleus_export":
    1, "ledger_id", "from", "prev"}` (prev = the chain hash before the first entry), then one
    line per entry with its canonical bytes (base64) beside the decoded fields: the format of
    docs/hashing.md, which the `jsonl-mirror` module writes too. With `--verify` (default)
    each entry's chain hash is recomputed from its record and the previous hash, so the file
    is known to match the daemon's chain; a mismatch exits 1. With `--output`, the file
    appears only once complete (written to FILE.partial, then renamed).
    """
    del export_format  # one format so far
    try:
        with _client(url, token_env) as api:
            target = api.pick_ledger(ledger)
            length = int(api.head(target)["length"])
            stop = length if to_seq is None else min(to_seq, length)
            if from_seq > stop:
                _error(f"--from {from_seq} is past the end ({stop})")
                raise typer.Exit(EXIT_CONFIG)
            _export(api, target, from_seq, stop, output, check=check, progress=progress)
    except ClientError as exc:
        raise _fail(exc) from None


def _export(
    api: DaemonClient,
    ledger: str,
    start: int,
    stop: int,
    output: Path | None,
    *,
    check: bool,
    progress: bool,
) -> None:
    partial_path = None if output is None else output.with_name(output.name + ".partial")
    try:
        sink: IO[bytes] = sys.stdout.buffer if partial_path is None else partial_path.open("wb")
    except OSError as exc:
        _error(f"cannot write {partial_path}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_CONFIG) from None
    # The header names the ledger and CHAIN_{start-1}, so that a slice verifies on its own.
    prev = (
        genesis(ledger)
        if start == 0
        else Hash.from_hex(api.page(ledger, start - 1, 1)["entries"][0]["hash"])
    )
    columns = (
        TextColumn(f"exporting {escape(ledger)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    written = 0
    try:
        with Progress(*columns, console=_err.real, disable=not progress) as bar:
            task = bar.add_task("export", total=stop - start)
            sink.write(export_header(ledger, start, prev))
            for entry in api.entries(ledger, start, stop):
                record = _committed_record(ledger, entry)
                if check:
                    prev = _check_link(ledger, entry, record, prev)
                sink.write(entry_line(record, Hash.from_hex(entry["hash"])))
                written += 1
                if written % 256 == 0:
                    bar.update(task, completed=written)
            bar.update(task, completed=written)
        sink.flush()
    except BaseException:
        if partial_path is not None:
            sink.close()
            partial_path.unlink(missing_ok=True)
        raise
    if output is not None and partial_path is not None:
        sink.close()
        os.replace(partial_path, output)
    where = "stdout" if output is None else str(output)
    checked = ", chain verified" if check else ""
    _err.print(f"exported {written} entries of {ledger!r} to {where}{checked}", markup=False)


def _committed_record(ledger: str, entry: dict[str, Any]) -> Record:
    """The committed record of an entry the API served (exit 1 if it is not one)."""
    seq = entry.get("seq")
    try:
        return Record(
            entry["kind"], entry["payload"], entry["meta"], seq=seq, timestamp=entry["timestamp"]
        )
    except (InvalidRecord, KeyError, TypeError) as exc:
        _error(f"entry {seq} of {ledger!r} cannot be exported: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None


def _check_link(ledger: str, entry: dict[str, Any], record: Record, prev: Hash) -> Hash:
    seq = entry["seq"]
    expected = chain_hash(prev, seq, leaf_hash(canonical_bytes(record)))
    if expected.hex() != entry["hash"]:
        _error(
            f"entry {seq} of {ledger!r} does not chain: its hash is {entry['hash']}, its record "
            f"and the previous hash give {expected.hex()} (export stopped)"
        )
        raise typer.Exit(EXIT_FAILURE)
    return expected


# -- proofs (client) --------------------------------------------------------------------------
prove_app = typer.Typer(
    help="Fetch a Merkle proof from a daemon and verify it locally against a signed "
    "checkpoint: exit 0 when it verifies, 1 when it does not.",
    no_args_is_help=True,
)
app.add_typer(prove_app, name="prove")

KeyOpt = Annotated[
    str, typer.Option("--key", help="The checkpoint's verifier key (the string, or a file).")
]


def _checkpoint_from(client: Any, ledger: str, path: Path | None, verifier: Any) -> Any:
    note = _read_note(path) if path is not None else client.checkpoint(ledger)
    return _checked_checkpoint(note, verifier, str(path or f"{ledger!r}'s checkpoint"))


@prove_app.command("inclusion")
def prove_inclusion(
    seq: Annotated[int, typer.Argument(min=0, help="The entry's seq.")],
    key: KeyOpt,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Signed checkpoint file (default: fetch the latest)."),
    ] = None,
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
) -> None:
    """Prove that entry SEQ, as the daemon serves it, is in a signed checkpoint's tree.

    Checks the checkpoint's signature, fetches the inclusion proof at the checkpoint's size and
    the entry, recomputes the entry's leaf hash from its record, and verifies the proof
    against the checkpoint's root.
    """
    from .errors import ProofError
    from .proofs import InclusionProof

    verifier = _verifier_key(key)
    try:
        with _client(url, token_env) as client:
            name = client.pick_ledger(ledger)
            signed = _checkpoint_from(client, name, checkpoint, verifier)
            if seq >= signed.size:
                _error(f"entry {seq} is not in the checkpoint: it covers {signed.size} entries")
                raise typer.Exit(EXIT_FAILURE)
            raw = client.inclusion_proof(name, seq, signed.size)
            entry = client.entry(name, seq)
    except ClientError as exc:
        raise _fail(exc) from None
    try:
        proof = InclusionProof.from_json(raw)
        record = Record(
            entry["kind"], entry["payload"], entry["meta"], seq=seq, timestamp=entry["timestamp"]
        )
        leaf = leaf_hash(canonical_bytes(record))
        if (proof.seq, proof.size, proof.root) != (seq, signed.size, signed.root):
            raise ProofError("the proof is not for this entry at the checkpoint's size and root")
        if leaf != proof.leaf:
            raise ProofError(f"the entry's leaf hash is {leaf.hex()}, the proof's {proof.leaf}")
        proof.verify()
    except (ProofError, InvalidRecord, KeyError, TypeError) as exc:
        _error(f"entry {seq} of {name!r}: inclusion does not verify: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    _out.print(
        f"entry {seq} of {name!r} is in checkpoint {signed.origin!r} at size {signed.size} "
        f"({len(proof.path)} hashes, root {signed.root.hex()})",
        markup=False,
    )


@prove_app.command("consistency")
def prove_consistency(
    old: Annotated[Path, typer.Argument(help="The older signed checkpoint (note file).")],
    key: KeyOpt,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Newer checkpoint file (default: fetch the latest)."),
    ] = None,
    url: Url = DEFAULT_URL,
    token_env: TokenEnv = "NUCLEUS_TOKEN",
    ledger: LedgerOpt = None,
) -> None:
    """Prove that the ledger only grew between two signed checkpoints (OLD, then the newer).

    Checks both signatures, fetches the consistency proof between their sizes, and verifies it
    against both roots.
    """
    from .errors import ProofError
    from .proofs import ConsistencyProof

    verifier = _verifier_key(key)
    older = _checked_checkpoint(_read_note(old), verifier, str(old))
    try:
        with _client(url, token_env) as client:
            name = client.pick_ledger(ledger)
            newer = _checkpoint_from(client, name, checkpoint, verifier)
            raw = None
            if 0 < older.size <= newer.size:
                raw = client.consistency_proof(name, older.size, newer.size)
    except ClientError as exc:
        raise _fail(exc) from None
    try:
        if older.size > newer.size:
            raise ProofError(f"the older checkpoint ({older.size}) is larger ({newer.size})")
        if older.size == newer.size and (older.root, older.chain) != (newer.root, newer.chain):
            raise ProofError(f"two different checkpoints of the same size {older.size}")
        if raw is not None:
            proof = ConsistencyProof.from_json(raw)
            if (proof.old_root, proof.new_root) != (older.root, newer.root):
                raise ProofError("the proof's roots are not the checkpoints' roots")
            proof.verify()
    except ProofError as exc:
        _error(f"{name!r}: consistency does not verify: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    _out.print(
        f"{name!r}: checkpoint at size {older.size} is a prefix of the one at size {newer.size}",
        markup=False,
    )


def main() -> None:
    """Entry point of the `nucleus` console script."""
    # `python -m nucleus_actors` puts the working directory first on sys.path, a console
    # script puts its own bin directory there: do as -m does, so that `use = "mymods:Class"`
    # finds mymods.py in the working directory with both (docs/cli.md: the same command).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None

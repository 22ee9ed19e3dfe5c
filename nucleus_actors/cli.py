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
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from . import __version__
from .daemon.client import (
    DEFAULT_URL,
    EXIT_BAD_INPUT,
    ClientError,
    DaemonClient,
    DaemonUnreachable,
    Reconnecting,
)
from .daemon.template import CONFIG_TEMPLATE
from .daemon.wire import dumps, jsonl_line
from .errors import IntegrityError, InvalidRecord, StorageError
from .hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from .record import Hash, Record

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as _Progress
    from rich.table import Table as _Table

# Client commands and `--version` must start fast: trio, the server (FastAPI, hypercorn),
# pydantic, httpx and most of rich are imported where a command needs them, not here (a test
# checks `sys.modules` after a client command).
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
        )
    except ConfigError as exc:
        _err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_CONFIG) from None
    raise typer.Exit(trio.run(daemon.run))


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A SQLite ledger file.")],
) -> None:
    """Verify a ledger file's whole hash chain (safe beside a running daemon).

    Exits 0 when it verifies, 1 on an integrity failure (naming the first bad seq), 2 when
    the file is missing or not a ledger file.
    """
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
            _error(f"{path}: integrity failure at seq {exc.seq}: {exc}")
            raise typer.Exit(EXIT_FAILURE) from None
        except StorageError as exc:
            progress.stop()
            _error(f"{path}: {exc}")
            raise typer.Exit(EXIT_CONFIG) from None
    entries = "entry" if length == 1 else "entries"
    _out.print(f"{path}: ok, {length} {entries}, head {head.hex()}", markup=False)


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
        _error(f"{export_file}: integrity failure at seq {exc.seq}: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
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
            )
            if not item["modules"]:
                _out.print("  no modules")
                continue
            table = Table(show_edge=False, pad_edge=False, box=None)
            for column in (
                "module", "version", "state", "restarts", "crashes", "inbox", "processed",
                "dropped",
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
                )
                if info := _info_text(m.get("info")):
                    notes.append(f"  {escape(m['id'])}: {escape(info)}")
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
    stream: IO[bytes], kind: str | None, meta: dict[str, str], problems: dict[int, str]
) -> Iterator[bytes]:
    """NDJSON chunks for the stream route, one output line per stdin line (so the daemon's
    line numbers are stdin's), read as they come (a pipe need not end).

    A line the daemon could never take (not JSON with `--kind`; not a record object without
    it) is noted in `problems` and sent as a blank line (which the daemon skips).
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
            out.append(_stdin_line(number, raw, kind, meta, problems))
        yield b"".join(out)
    if pending.strip():
        yield _stdin_line(number + 1, pending, kind, meta, problems)


def _stdin_line(
    number: int, raw: bytes, kind: str | None, meta: dict[str, str], problems: dict[int, str]
) -> bytes:
    if not raw.strip():
        return b"\n"
    if kind is None and not meta:
        return raw.rstrip(b"\r") + b"\n"  # a whole record: the daemon checks it
    try:
        value = json.loads(raw)
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
        extra = value.get("meta")
        record = {**value, "meta": {**meta, **extra} if isinstance(extra, dict) else extra}
    return dumps(record).encode() + b"\n"


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
    """
    del batch_size  # accepted for old scripts; stdin is streamed record by record
    extra = _parse_meta(meta or [])
    try:
        with _client(url, token_env) as api:
            target = api.pick_ledger(ledger)
            if payload is not None:
                if kind is None:
                    _error("--json needs --kind")
                    raise typer.Exit(EXIT_CONFIG)
                try:
                    value = json.loads(payload)
                except ValueError as exc:
                    _error(f"--json is not JSON: {exc}")
                    raise typer.Exit(EXIT_CONFIG) from None
                receipt = api.append(target, {"kind": kind, "payload": value, "meta": extra})
                _out.print(dumps(receipt), markup=False)
                return
            if sys.stdin.isatty():
                _error("give --kind K --json PAYLOAD, or pipe JSON Lines records on stdin")
                raise typer.Exit(EXIT_CONFIG)
            _append_stdin(api, target, kind, extra, progress)
    except ClientError as exc:
        raise _fail(exc) from None


def _append_stdin(
    api: DaemonClient, ledger: str, kind: str | None, meta: dict[str, str], progress: bool | None
) -> None:
    """Stream stdin to the daemon's NDJSON route; receipts to stdout as they come back."""
    from .daemon.upload import UploadError, upload_ndjson

    problems: dict[int, str] = {}  # refused before sending: line -> why
    seqs: list[int] = []
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
        _error(f"stdin line {number}: {message}")

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
                _stdin_lines(sys.stdin.buffer, kind, meta, problems),
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
    done = f"seqs {seqs[0]}..{seqs[-1]}" if seqs else "nothing appended"
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
    meanwhile are left for the next export). Each line is byte for byte what the
    `jsonl-mirror` module writes. With `--verify` (default) each entry's chain hash is
    recomputed from its record and the previous hash, so the file is known to match the
    daemon's chain; a mismatch exits 1. With `--output`, the file appears only once complete
    (written to FILE.partial, then renamed).
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
    prev: Hash | None = None
    if check:
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
            for entry in api.entries(ledger, start, stop):
                if prev is not None:
                    prev = _check_link(ledger, entry, prev)
                sink.write(jsonl_line(entry))
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


def _check_link(ledger: str, entry: dict[str, Any], prev: Hash) -> Hash:
    seq = entry["seq"]
    try:
        record = Record(
            entry["kind"], entry["payload"], entry["meta"], seq=seq, timestamp=entry["timestamp"]
        )
        expected = chain_hash(prev, seq, leaf_hash(canonical_bytes(record)))
    except (InvalidRecord, KeyError, TypeError) as exc:
        _error(f"entry {seq} of {ledger!r} cannot be checked: {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    if expected.hex() != entry["hash"]:
        _error(
            f"entry {seq} of {ledger!r} does not chain: its hash is {entry['hash']}, its record "
            f"and the previous hash give {expected.hex()} (export stopped)"
        )
        raise typer.Exit(EXIT_FAILURE)
    return expected


def main() -> None:
    """Entry point of the `nucleus` console script."""
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None

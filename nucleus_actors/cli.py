"""The `nucleus` command line: `init`, `check`, `run`, `verify` (needs the daemon extra).

Exit statuses: 0 success; 1 a ledger failed, the server could not listen, or a ledger file
does not verify; 2 unusable input (bad configuration, unreadable file, bad option).
"""

from __future__ import annotations

import enum
import logging
from functools import partial
from pathlib import Path
from typing import Annotated

import trio
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from . import __version__
from .daemon.config import ConfigError, load_config
from .daemon.logs import configure_logging
from .daemon.server import EXIT_CONFIG, EXIT_FAILURE, Daemon
from .daemon.template import CONFIG_TEMPLATE
from .errors import IntegrityError, StorageError
from .storage import verify_file

__all__ = ["app", "main"]

app = typer.Typer(
    name="nucleus",
    help="Run and inspect nucleus_actors ledgers: blake3-chained append-only logs with "
    "supervised modules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


class LogFormat(enum.StrEnum):
    """How `nucleus run` writes its log lines."""

    text = "text"
    json = "json"


def _error(message: str) -> None:
    _err.print(f"error: {message}", markup=False, style="bold red")


def _version(value: bool) -> None:
    if value:
        _out.print(f"nucleus_actors {__version__}", markup=False)
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
        LogFormat, typer.Option("--log-format", help="Log lines as text or JSON.")
    ] = LogFormat.text,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run the ledger daemon: every ledger of CONFIG behind the HTTP/JSON API.

    Logs "listening on http://HOST:PORT" once bound. SIGTERM or SIGINT shuts down
    gracefully (in-flight requests finish, every module's stop runs) and exits 0; a second
    signal forces exit. Exits 1 when a ledger fails (on_ledger_failure = "exit"), 2 on a
    configuration error.
    """
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        _error(f"--log-level must be debug, info, warning or error, got {log_level!r}")
        raise typer.Exit(EXIT_CONFIG)
    configure_logging(log_format.value, level)
    try:
        settings = load_config(config)
        daemon = Daemon(settings, host=host, port=port)
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
    columns = (
        TextColumn("verifying {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_err, transient=False) as progress:
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


def main() -> None:
    """Entry point of the `nucleus` console script."""
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None

"""Checks `nucleus check` and `nucleus run` share before anything starts (exit 2 on failure).

`build_hosts` registers every module (which imports and builds it); these checks add what
registering does not catch, so that a configuration `check` calls ok is one `run` starts:

* every `depends_on` names a module of the same ledger, and there is no dependency cycle;
* each module's own settings pass its class's optional static `check_config(config)`;
* each SQLite ledger file can be created or opened for writing (its directory exists and is
  writable; an existing file is a writable regular file);
* each PostgreSQL ledger's server answers (DSN, password, database, role: whichever is wrong
  is named) and its schema, if it exists, belongs to this ledger.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigProblem, DaemonConfig, LedgerSettings
from .discovery import resolve_use

if TYPE_CHECKING:
    from .host import LedgerHost

__all__ = ["preflight"]


def preflight(config: DaemonConfig, hosts: Mapping[str, LedgerHost]) -> list[ConfigProblem]:
    """Every problem found by the checks above, in file order (empty when none)."""
    problems: list[ConfigProblem] = []
    for index, settings in enumerate(config.ledgers):
        where = f"ledgers[{index}]"
        problems += _module_configs(index, settings)
        host = hosts.get(settings.id)
        if host is not None:
            ids = [handle.id for handle in host.engine.modules]
            if len(ids) == len(settings.modules):  # else registering already failed
                problems += _dependencies(index, settings, ids)
        if settings.postgres:
            message = _postgres_problem(settings, config.base_dir)
            if message is not None:
                problems.append(ConfigProblem(f"{where}.storage (ledger {settings.id!r})", message))
        path = settings.storage_path(config.base_dir)
        if path is not None:
            message = _storage_problem(path)
            if message is not None:
                problems.append(ConfigProblem(f"{where}.storage (ledger {settings.id!r})", message))
    return problems


def _module_configs(index: int, settings: LedgerSettings) -> list[ConfigProblem]:
    problems = []
    for position, module in enumerate(settings.modules):
        try:
            cls = resolve_use(module.use)
        except ValueError:
            continue  # reported by the configuration's own validation
        check = getattr(cls, "check_config", None)
        if check is None:
            continue
        try:
            check(dict(module.config))
        except Exception as exc:  # a module's check may raise anything: it is the module's
            problems.append(
                ConfigProblem(
                    f"ledgers[{index}].modules[{position}].config (ledger {settings.id!r}, "
                    f"module {module.use!r})",
                    f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc),
                )
            )
    return problems


def _dependencies(index: int, settings: LedgerSettings, ids: list[str]) -> list[ConfigProblem]:
    where = f"ledgers[{index}]"
    problems = []
    depends = {
        module_id: list(m.depends_on) for module_id, m in zip(ids, settings.modules, strict=True)
    }
    for position, (module_id, deps) in enumerate(depends.items()):
        for dep in deps:
            if dep not in depends:
                problems.append(
                    ConfigProblem(
                        f"{where}.modules[{position}].depends_on (ledger {settings.id!r}, "
                        f"module {module_id!r})",
                        f"module {module_id!r} depends on unknown module {dep!r} (the ledger's "
                        f"modules are {', '.join(ids)})",
                    )
                )
    if problems:
        return problems
    done: set[str] = set()
    remaining = dict(depends)
    while remaining:
        ready = [m for m, deps in remaining.items() if all(d in done for d in deps)]
        if not ready:
            cycle = " -> ".join(sorted(remaining))
            return [
                ConfigProblem(
                    f"{where}.modules (ledger {settings.id!r})", f"dependency cycle among: {cycle}"
                )
            ]
        for module_id in ready:
            done.add(module_id)
            del remaining[module_id]
    return problems


def _storage_problem(path: Path) -> str | None:
    parent = path.parent
    if not parent.is_dir():
        return f"cannot create the ledger file {path}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"cannot write in directory {parent} (for {path.name} and its -wal/-shm files): "
            "permission denied"
        )
    if path.exists():
        if not path.is_file():
            return f"the ledger file {path} is not a regular file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"the ledger file {path} is not readable and writable by this user"
    return None


def _postgres_problem(settings: LedgerSettings, base_dir: Path) -> str | None:
    """Connect once (5 s at most) and read the schema's ledger id, if the schema exists."""
    try:
        dsn = settings.dsn(base_dir)
    except ValueError as exc:
        return str(exc)
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        return "PostgreSQL storage needs psycopg 3: pip install 'nucleus_actors[postgres]'"
    from ..storage.postgres import redact

    schema = settings.pg_schema
    try:
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
            if found is None or found[0] is None:
                return None
            query = sql.SQL("SELECT value FROM {}.meta WHERE key = 'ledger_id'").format(
                sql.Identifier(schema)
            )
            row = conn.execute(query).fetchone()
    except psycopg.ProgrammingError as exc:
        return f"bad PostgreSQL connection string {redact(dsn)}: {' '.join(str(exc).split())}"
    except psycopg.Error as exc:
        return f"cannot connect to PostgreSQL {redact(dsn)}: {' '.join(str(exc).split())}"
    if row is not None and row[0] != settings.id:
        return (
            f"PostgreSQL schema {schema!r} holds ledger {row[0]!r}, not {settings.id!r} "
            "(one ledger per schema: set `schema`)"
        )
    return None

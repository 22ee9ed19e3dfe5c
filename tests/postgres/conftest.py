"""Fixtures for the PostgreSQL tests: the server at $NUCLEUS_TEST_PG_DSN (default
`postgresql://postgres@127.0.0.1:5432/test`), a fresh schema per test, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

psycopg = pytest.importorskip(
    "psycopg", reason="PostgreSQL tests need psycopg (the postgres extra)"
)

DSN = os.environ.get("NUCLEUS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable() -> str | None:
    try:
        with psycopg.connect(DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {DSN} is unreachable: {' '.join(str(exc).split())}"
    return None


_WHY = _reachable()


@pytest.fixture
def pg_dsn() -> str:
    """The test server's DSN (the test is skipped, with the reason, if it is unreachable)."""
    if _WHY is not None:
        pytest.skip(_WHY)
    return DSN


def drop_schema(schema: str) -> None:
    with psycopg.connect(DSN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_schemas(pg_dsn: str) -> Iterator[Callable[[], str]]:
    """Makes unique schema names (`t_<random>`); every one made is dropped after the test."""
    made: list[str] = []

    def new() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        made.append(name)
        return name

    yield new
    for name in made:
        drop_schema(name)


@pytest.fixture
def pg_schema(pg_schemas: Callable[[], str]) -> str:
    """One unique schema name, dropped after the test."""
    return pg_schemas()


from tests.daemon.conftest import start_daemon  # noqa: E402, F401 (the fixture, for daemon tests)


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    """A running PostgreSQL cluster owned by the test (initdb + pg_ctl on 127.0.0.1 and a
    free port), removed afterwards; skipped with the reason when it cannot be made."""
    from tests.postgres.cluster import Cluster, unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()

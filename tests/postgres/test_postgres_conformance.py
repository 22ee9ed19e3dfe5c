"""The storage conformance suite on PostgreSQL (`PostgresStorage`, one schema per store)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nucleus_actors.storage import PostgresStorage, StorageBackend
from nucleus_actors.testing import StorageConformance


class TestPostgresStorage(StorageConformance):
    @pytest.fixture
    def storage_factory(
        self, pg_dsn: str, pg_schemas: Callable[[], str]
    ) -> Callable[[], StorageBackend]:
        return lambda: PostgresStorage(pg_dsn, schema=pg_schemas(), lease_timeout=2.0)

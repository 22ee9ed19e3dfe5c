"""The storage conformance suite (`nucleus_actors.testing.StorageConformance`) against our
backends, and against a backend that implements no capability."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBackend
from nucleus_actors.testing import StorageConformance


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    def storage_factory(self) -> Callable[[], StorageBackend]:
        return MemoryStorage


class TestSQLiteStorage(StorageConformance):
    @pytest.fixture
    def storage_factory(self, tmp_path: Path) -> Callable[[], StorageBackend]:
        files = iter(range(1_000))
        return lambda: SQLiteStorage(tmp_path / f"ledger-{next(files)}.db")


class TestSQLiteStorageNormalDurability(StorageConformance):
    @pytest.fixture
    def storage_factory(self, tmp_path: Path) -> Callable[[], StorageBackend]:
        return lambda: SQLiteStorage(tmp_path / "ledger.db", durability="normal")


class EntriesOnly(MemoryStorage):
    """A v2 backend with no capability: it must refuse batches carrying cursors, tiles, keys."""

    load_cursors = None  # type: ignore[assignment]
    read_tiles = None  # type: ignore[assignment]
    get_idempotency = None  # type: ignore[assignment]
    prune_idempotency = None  # type: ignore[assignment]


class TestEntriesOnlyBackend(StorageConformance):
    @pytest.fixture
    def storage_factory(self) -> Callable[[], StorageBackend]:
        return EntriesOnly


BROKEN = '''
import pytest
from nucleus_actors.storage import MemoryStorage
from nucleus_actors.testing import StorageConformance


class NoChecks(MemoryStorage):
    """Stores whatever it is given: no order, chain or bounds checks."""

    async def append(self, batch):
        self._rows.extend((e.canonical, e.hash) for e in batch.entries)
        if batch.entries:
            self._head = batch.entries[-1].hash
        self._cursors.update(batch.cursors)


class DropsCursors(MemoryStorage):
    async def load_cursors(self):
        return {}


class TestNoChecks(StorageConformance):
    @pytest.fixture
    def storage_factory(self):
        return NoChecks


class TestDropsCursors(StorageConformance):
    @pytest.fixture
    def storage_factory(self):
        return DropsCursors


class TestNoFactory(StorageConformance):
    pass
'''


def test_the_suite_catches_broken_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    failed = {
        line.split("::")[1] + "::" + line.split("::")[2].split(" ")[0]
        for line in result.outlines
        if line.startswith("FAILED")
    }
    assert {
        "TestNoChecks::test_out_of_order_batches_are_refused",
        "TestNoChecks::test_a_batch_chained_to_another_head_is_refused",
        "TestNoChecks::test_every_part_of_a_batch_commits_together",
        "TestNoChecks::test_a_non_batch_is_refused",
        "TestDropsCursors::test_cursors_upsert_and_survive_reopen",
    } <= failed
    assert not any(
        name.startswith("TestDropsCursors::")
        for name in failed - {"TestDropsCursors::test_cursors_upsert_and_survive_reopen"}
    )
    result.stdout.fnmatch_lines(["*fixture 'storage_factory' not found*"])
    assert outcomes["errors"] == len(
        [name for name in dir(StorageConformance) if name.startswith("test_")]
    )

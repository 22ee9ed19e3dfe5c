"""Idempotent appends (issue 15, section 3): a retry with the same key returns the first
receipts; a different request with a used key, or a key in flight, is refused; keys commit with
their entries and survive a restart; they expire after `idempotency_window`."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from nucleus_actors import IdempotencyConflict, LedgerConfig, Record, open_ledger
from nucleus_actors.module import Module
from nucleus_actors.storage import SQLiteStorage


async def test_a_retry_with_the_same_key_returns_the_first_receipt_and_appends_nothing() -> None:
    async with open_ledger(LedgerConfig(ledger_id="m")) as engine:
        first = await engine.append(Record("k", {"n": 1}), idempotency_key="order-1")
        again, replayed = await engine.append_keyed([Record("k", {"n": 1})], "order-1")
        assert (again, replayed) == ([first], True)
        assert await engine.append(Record("k", {"n": 1}), idempotency_key="order-1") == first
        assert engine.state.length == 1
        many = await engine.append_many([Record("k", 2), Record("k", 3)], idempotency_key="batch-1")
        assert (
            await engine.append_many([Record("k", 2), Record("k", 3)], idempotency_key="batch-1")
            == many
        )
        assert engine.state.length == 3


async def test_a_used_key_with_a_different_request_is_refused() -> None:
    async with open_ledger(LedgerConfig(ledger_id="m")) as engine:
        await engine.append(Record("k", {"n": 1}), idempotency_key="order-1")
        with pytest.raises(IdempotencyConflict, match="used for a different request") as info:
            await engine.append(Record("k", {"n": 2}), idempotency_key="order-1")
        assert info.value.in_flight is False
        assert info.value.key == "order-1"
        with pytest.raises(ValueError, match="printable ASCII"):
            await engine.append(Record("k", 1), idempotency_key="a b")
        assert engine.state.length == 1


class Gate(Module):
    id = "gate"

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()

    async def before_append(self, record: Record) -> Record:
        self.entered.set()
        await self.release.wait()
        return record


async def test_a_key_in_flight_is_refused_and_released_once_answered() -> None:
    gate = Gate()
    async with open_ledger(LedgerConfig(ledger_id="m"), modules=[lambda: gate]) as engine:
        receipts: list[object] = []

        async def first() -> None:
            receipts.append(await engine.append(Record("k", 1), idempotency_key="x"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await gate.entered.wait()
            with pytest.raises(IdempotencyConflict, match="in flight") as info:
                await engine.append(Record("k", 1), idempotency_key="x")
            assert info.value.in_flight is True
            gate.release.set()
        assert await engine.append(Record("k", 1), idempotency_key="x") == receipts[0]
        assert engine.state.length == 1


async def test_keys_survive_a_restart_and_expire_after_the_window(tmp_path: Path) -> None:
    now = [1_800_000_000_000_000]

    def clock() -> int:
        return now[0]

    config = LedgerConfig(ledger_id="m", wall_clock=clock, idempotency_window=60.0)
    path = tmp_path / "m.db"
    async with open_ledger(config, storage=SQLiteStorage(path)) as engine:
        first = await engine.append(Record("k", 1), idempotency_key="key")
    async with open_ledger(config, storage=SQLiteStorage(path)) as engine:
        now[0] += 59_000_000
        again, replayed = await engine.append_keyed([Record("k", 1)], "key")
        assert (again, replayed) == ([first], True)
        now[0] += 2_000_000  # past the window: the key is forgotten
        fresh, replayed = await engine.append_keyed([Record("k", 1)], "key")
        assert replayed is False
        assert fresh[0].seq == 1
        again, replayed = await engine.append_keyed([Record("k", 1)], "key")
        assert (again, replayed) == (fresh, True)


async def test_append_each_keyed_gives_each_record_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "each.db"
    async with open_ledger(LedgerConfig(ledger_id="m"), storage=SQLiteStorage(path)) as engine:
        first = await engine.append_each_keyed(
            [Record("k", 0), Record("k", 1), Record("k", 2)], ["a", None, "c"]
        )
        assert [o[1] for o in first if isinstance(o, tuple)] == [False, False, False]
        receipts = [o[0] for o in first if isinstance(o, tuple)]
        assert [r.seq for r in receipts] == [0, 1, 2]
    # keys survive a restart; each outcome stands alone
    async with open_ledger(LedgerConfig(ledger_id="m"), storage=SQLiteStorage(path)) as engine:
        outcomes = await engine.append_each_keyed(
            [Record("k", 0), Record("k", 1), Record("k", "other"), Record("k", 3), Record("k", 4)],
            ["a", None, "c", "d", "d"],
        )
        assert outcomes[0] == (receipts[0], True)  # a replay: the first receipt
        assert isinstance(outcomes[1], tuple)
        assert outcomes[1][0].seq == 3  # no key: appended again
        assert isinstance(outcomes[2], IdempotencyConflict)
        assert outcomes[2].in_flight is False
        assert isinstance(outcomes[3], tuple)
        assert outcomes[3][0].seq == 4
        assert isinstance(outcomes[4], IdempotencyConflict)  # the same key twice: in flight
        assert outcomes[4].in_flight is True
        assert engine.state.length == 5
        with pytest.raises(ValueError, match="one key"):
            await engine.append_each_keyed([Record("k", 1)], [])
        with pytest.raises(ValueError, match="printable ASCII"):
            await engine.append_each_keyed([Record("k", 1)], ["a b"])
        again = await engine.append_each_keyed([Record("k", 3)], ["d"])  # the key is released
        assert again == [(outcomes[3][0], True)]
